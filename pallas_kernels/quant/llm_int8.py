"""LLM.int8() preparation in pure jnp: argument checks, absmax int8 quantization and the outlier split.

Shared by ``api.int8_matmul`` (whose int8 x int8 core is a Pallas kernel) and
``reference.int8_matmul`` (whose core is a jnp matmul), so the reference never calls the code it checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .formats import QuantizedWeight

DEFAULT_OUTLIER_THRESHOLD = 6.0


def check_x(x, K, what="x"):
    if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"{what}: got shape {tuple(getattr(x, 'shape', ()))}, expected [..., {K}] (last dim = K of the weight)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what}: got dtype {x.dtype} with shape {tuple(x.shape)}, expected a floating dtype")


def check_args(x, w, outlier_threshold, max_outliers):
    """Validates ``int8_matmul``'s arguments; returns ``(K, N, threshold or None, max_outliers)``."""
    if isinstance(w, QuantizedWeight):
        if w.fmt != "int8" or w.group_size is not None or not w.symmetric or len(w.shape) != 2:
            raise ValueError(
                f"w: got QuantizedWeight(fmt={w.fmt!r}, group_size={w.group_size}, symmetric={w.symmetric}, "
                f"shape={w.shape}), expected quantize(w, 'int8') (2-D, per-channel, symmetric)"
            )
        K, N = w.shape
    else:
        if not hasattr(w, "ndim") or w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(
                f"w: got shape {tuple(getattr(w, 'shape', ()))} dtype {getattr(w, 'dtype', None)}, expected a float [K, N] weight or quantize(w, 'int8')"
            )
        K, N = w.shape
    check_x(x, K)
    if outlier_threshold is True:
        outlier_threshold = DEFAULT_OUTLIER_THRESHOLD
    if outlier_threshold is not None and not (isinstance(outlier_threshold, (int, float)) and outlier_threshold > 0):
        raise ValueError(f"outlier_threshold: got {outlier_threshold!r}, expected None, True or a positive float")
    if max_outliers is None:
        max_outliers = min(K, max(16, K // 64))
    if not isinstance(max_outliers, (int, np.integer)) or not 1 <= max_outliers <= K:
        raise ValueError(f"max_outliers: got {max_outliers!r}, expected an int in [1, K={K}]")
    return K, N, outlier_threshold, int(max_outliers)


def absmax_quant(a, axis):
    """Symmetric int8 with absmax -> 127 along ``axis``; returns (q int8, scale = absmax / 127, keepdims)."""
    amax = jnp.max(jnp.abs(a), axis=axis, keepdims=True)
    scale = amax / 127.0
    q = jnp.clip(jnp.round(a / jnp.where(scale > 0, scale, 1.0)), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


def prepare(x, w, outlier_threshold, max_outliers):
    """-> ``(xq [M, K] int8, sx [M, 1], wq [K, N] int8, sw [1, N], out_extra [M, N] f32 or None)``.

    ``out_extra`` is the 16-bit product of the outlier feature columns (None without a threshold);
    those columns are zeroed in ``xq`` (and, for a float W, excluded from W's column scales).
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K).astype(jnp.float32)
    prepared = isinstance(w, QuantizedWeight)
    wf = None if prepared else w.astype(jnp.float32)
    out_extra = None
    if outlier_threshold is not None:
        is_out = jnp.max(jnp.abs(x2), axis=0) >= outlier_threshold  # [K]
        idx = jnp.nonzero(is_out, size=max_outliers, fill_value=0)[0]
        valid = jnp.arange(max_outliers) < jnp.sum(is_out)
        sel = jnp.zeros((K,), jnp.int32).at[idx].add(valid.astype(jnp.int32)) > 0
        hp = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
        x_o = jnp.where(valid[None, :], x2[:, idx], 0.0).astype(hp)
        w_rows = w.data[idx].astype(jnp.float32) * w.scales if prepared else wf[idx]
        w_o = jnp.where(valid[:, None], w_rows, 0.0).astype(hp)
        # 16-bit operands, fp32 products/accumulation (exact products, so done as an f32 dot: XLA:CPU
        # has no bf16 x bf16 -> f32 dot).
        out_extra = jnp.matmul(x_o.astype(jnp.float32), w_o.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        x2 = jnp.where(sel[None, :], 0.0, x2)
        if not prepared:
            wf = jnp.where(sel[:, None], 0.0, wf)
    xq, sx = absmax_quant(x2, axis=1)
    if prepared:
        wq, sw = w.data, w.scales.astype(jnp.float32)
    else:
        wq, sw = absmax_quant(wf, axis=0)
    return xq, sx, wq, sw, out_extra
