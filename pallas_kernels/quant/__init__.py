"""Quantized matmuls: int8 / int4 / NF4 weight-only kernels with fused dequantization and W8A8 (LLM.int8()).

Pallas kernels on the Triton backend (``backend="gpu"``), the same kernels in interpret mode on CPU
(``backend="interpret"``), Mosaic TPU kernels (``backend="tpu"``, or ``"tpu_interpret"`` on CPU)
and a pure-jnp reference (``backend="reference"``). ``backend="auto"`` picks gpu / tpu / interpret.
Depends on jax only.

    qw = quantize(w, "nf4", double_quant=True)          # w: [K, N] (or [..., K, N]); ~0.516 bytes/param
    y = quantized_matmul(x, qw)                         # x: [..., K] -> [..., N], x's dtype; grad wrt x
    w_ref = dequantize(qw, jnp.bfloat16)
    y8 = int8_matmul(x, w, outlier_threshold=6.0)       # W8A8 with LLM.int8() outlier decomposition
    y8 = int8_matmul(x, quantize(w, "int8"))            # ... or with a prepared per-channel int8 weight

``QuantizedWeight`` is a pytree (array leaves: data, scales, zeros, dq_scales, dq_mean; static: fmt,
shape, group_size, symmetric, double_quant), so it goes through jit, tree_map, sharding and orbax.
"""

from .api import int8_matmul, quantized_matmul
from .formats import NF4_CODEBOOK, QuantizedWeight, dequantize, quantize

__all__ = ["QuantizedWeight", "quantize", "dequantize", "quantized_matmul", "int8_matmul", "NF4_CODEBOOK"]
