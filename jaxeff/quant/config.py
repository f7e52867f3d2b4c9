"""The `quant` config section: quantization-aware training and post-training quantization (method qat)."""

from jaxeff.schema import Section


class QuantConfig(Section):
    pass
