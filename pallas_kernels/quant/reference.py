"""Pure-jnp references (dequantize-then-matmul) with the same signatures as ``api``."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import llm_int8
from .formats import QuantizedWeight, dequantize

_HI = lax.Precision.HIGHEST


def quantized_matmul(x, qw: QuantizedWeight, *, block_sizes=None):
    """``x [..., K] @ dequantize(qw)`` in float32, returned in x's dtype. ``block_sizes`` is ignored."""
    del block_sizes
    w = dequantize(qw, jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), w, precision=_HI).astype(x.dtype)


def quantized_matmul_t(dy, qw: QuantizedWeight, *, block_sizes=None):
    """``dy [..., N] @ dequantize(qw).T`` in float32, returned in dy's dtype (the gradient wrt x)."""
    del block_sizes
    w = dequantize(qw, jnp.float32)
    return jnp.matmul(dy.astype(jnp.float32), w.T, precision=_HI).astype(dy.dtype)


def w8a8_core(xq, sx, wq, sw, out_dtype):
    """int8 [M, K] @ int8 [K, N] with int32 accumulation, times sx [M, 1] * sw [1, N]."""
    acc = jnp.matmul(xq, wq, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)


def int8_matmul(x, w, *, outlier_threshold=None, max_outliers=None, block_sizes=None):
    """``api.int8_matmul`` in pure jnp: the shared LLM.int8() preparation (``llm_int8``: quantization
    and outlier split) and ``w8a8_core``; never calls ``api``. ``block_sizes`` is ignored."""
    del block_sizes
    K, N, outlier_threshold, max_outliers = llm_int8.check_args(x, w, outlier_threshold, max_outliers)
    xq, sx, wq, sw, out_extra = llm_int8.prepare(x, w, outlier_threshold, max_outliers)
    out = w8a8_core(xq, sx, wq, sw, jnp.float32)
    if out_extra is not None:
        out = out + out_extra
    return out.astype(x.dtype).reshape(x.shape[:-1] + (N,))
