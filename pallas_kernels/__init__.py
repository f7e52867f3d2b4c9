"""Pallas kernels for jaxeff, importable on their own (they depend on jax only).

One folder per op: ``api.py`` (public function + backend dispatch), ``reference.py`` (pure jnp,
same signature), one file per backend and its backward.

- ``attention``: :func:`flash_attention` (forward + backward; causal, sliding window, GQA/MQA,
  packed segments) and :func:`flash_decode` (short queries against a long KV cache).
- ``quant``: :func:`quantize` / :func:`dequantize` (int8, int4, NF4 + double quantization),
  :func:`quantized_matmul` (weight-only, dequantization fused) and :func:`int8_matmul` (W8A8).

Backends: ``"gpu"`` (Pallas on Triton), ``"tpu"`` (Mosaic), ``"interpret"`` (CPU), ``"auto"``;
attention also ``"mosaic_gpu"`` (Hopper forward on Pallas Mosaic GPU, opt-in) and its interpreter.
"""

from pallas_kernels.attention import attention_reference, flash_attention, flash_decode
from pallas_kernels.quant import NF4_CODEBOOK, QuantizedWeight, dequantize, int8_matmul, quantize, quantized_matmul

__all__ = [
    "flash_attention",
    "flash_decode",
    "attention_reference",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "quantized_matmul",
    "int8_matmul",
    "NF4_CODEBOOK",
]
