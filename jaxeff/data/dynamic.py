"""Dynamic batch loading (Sheared-LLaMA): domain weights follow where the model lags its reference losses."""

from jaxeff.schema import Section


class DynamicBatchConfig(Section):
    pass
