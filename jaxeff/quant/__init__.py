"""Quantization: quantizers, fake quant (STE, LSQ scales), QAT (method ``qat``), PTQ (dynamic and
static calibration), conversion to the low-bit kernels (method ``quantized``). See docs/quant.md."""

from jaxeff.quant import convert, qat  # noqa: F401  (register methods "quantized", "qat")
from jaxeff.quant.fake_quant import fake_quant
from jaxeff.quant.quantizers import QuantSpec, compute_scale_zero, quantize_dequantize

__all__ = ["QuantSpec", "compute_scale_zero", "quantize_dequantize", "fake_quant"]
