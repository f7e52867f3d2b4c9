"""The `quant` config section: quantization-aware training (method ``qat``), post-training
quantization, and conversion to the low-bit kernels (method ``quantized``).

Layers are chosen by regular expressions searched in the ``nn.Dense`` module path, e.g.
``layers_0/attn/q`` or ``layers_3/mlp/down`` (``lm_head`` when embeddings are untied; the
embedding table is never quantized).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxeff.targets import BLOCK_LAYERS  # noqa: F401  (re-exported: quant's default rule)
from jaxeff.schema import Section


def _check_regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"expected a regular expression ({e})") from None
    return v


class QuantizerConfig(Section):
    """One quantizer: bits, symmetric or zero point, granularity; or ternary (BitNet b1.58)."""

    bits: int = Field(8, ge=2, le=8)
    symmetric: bool = True
    # weights: tensor | channel (per output column) | group (group_size rows of K per column);
    # activations: tensor | channel (per token) | group (group_size features per token)
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(64, gt=0)
    ternary: bool = False  # weights in {-1, 0, 1} x absmean scale; bits/symmetric are ignored
    learnable_scale: bool = False  # LSQ: weight scales become trained parameters (weights only)

    def spec(self):
        from jaxeff.quant.quantizers import QuantSpec

        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity=self.granularity, group_size=self.group_size, ternary=self.ternary)


class CalibrationConfig(Section):
    """Static activation ranges for PTQ, one per layer input, over ``batches`` training batches."""

    batches: int = Field(8, gt=0)
    method: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(99.99, gt=50.0, le=100.0)  # of the values (hi) and 100 - p (lo)


class ConvertConfig(Section):
    """The real quantized model (method ``quantized``): Dense kernels become ``QuantizedWeight`` leaves
    run by ``pallas_kernels.quant``."""

    format: Literal["int8", "int4", "nf4", "w8a8"] = "int8"  # w8a8 = LLM.int8() int8_matmul
    group_size: int | None = None  # int8: None = per channel; int4 / nf4: None = 64
    symmetric: bool = True
    double_quant: bool = False  # nf4 only
    outlier_threshold: float | None = Field(None, gt=0)  # w8a8: LLM.int8() decomposition (6.0)
    backend: Literal["auto", "gpu", "tpu", "interpret", "tpu_interpret", "reference"] = "auto"


class QuantConfig(Section):
    weight: QuantizerConfig | None = Field(default_factory=QuantizerConfig)  # null = float weights
    activation: QuantizerConfig | None = None  # null = float activations
    weight_layers: str = BLOCK_LAYERS  # rule (regex, whole module path) for the Dense layers whose kernels are quantized
    activation_layers: str = BLOCK_LAYERS  # rule for the Dense layers whose inputs are quantized
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)

    @field_validator("weight_layers", "activation_layers")
    @classmethod
    def _regex(cls, v: str) -> str:
        return _check_regex(v)

    @model_validator(mode="after")
    def _checks(self):
        w, a = self.weight, self.activation
        if w is not None and w.learnable_scale and not (w.symmetric or w.ternary):
            raise ValueError("weight.learnable_scale: learned scales need symmetric weights (no learned zero point)")
        if a is not None and (a.ternary or a.learnable_scale):
            raise ValueError("activation: ternary and learnable_scale apply to weights only")
        c = self.convert
        if c.double_quant and c.format != "nf4":
            raise ValueError("convert.double_quant: only for convert.format=nf4")
        if c.outlier_threshold is not None and c.format != "w8a8":
            raise ValueError("convert.outlier_threshold: only for convert.format=w8a8")
        if c.format in ("nf4", "w8a8") and not c.symmetric:
            raise ValueError(f"convert.symmetric: {c.format} is symmetric, expected true")
        return self
