"""Quantization: quantizers, fake quant (STE, LSQ scales), QAT (method ``qat``), PTQ (dynamic and
static calibration), conversion to the low-bit kernels (method ``quantized``). See docs/quant.md.
Names load their module on first use (``jaxeff.cli`` imports ``jaxeff.quant.cli`` for every command)."""

from jaxeff._lazy import lazy_getattr

_EXPORTS = {
    "fake_quant": "jaxeff.quant.fake_quant",
    **{name: "jaxeff.quant.quantizers" for name in ("QuantSpec", "compute_scale_zero", "quantize_dequantize")},
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
