"""Public quantized-matmul API and backend dispatch.

Backends: "gpu" (Pallas on Triton), "interpret" (the same Triton-backend kernels with
``interpret=True``, runs on CPU), "tpu" (Pallas Mosaic TPU kernels, ``mosaic_tpu.py``; not yet run on
TPU hardware), "tpu_interpret" (the TPU kernels under ``pltpu.InterpretParams()``, runs on CPU),
"reference" (pure jnp dequantize-then-matmul), "auto" (gpu on GPU, tpu on TPU, interpret otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._backend import resolve_backend
from pallas_kernels._util import pad_to, round_up

from . import llm_int8, mosaic_tpu, reference, triton_matmul
from .formats import QuantizedWeight

BACKENDS = ("auto", "gpu", "tpu", "interpret", "tpu_interpret", "reference")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str) -> str:
    return resolve_backend(backend, BACKENDS)


# ------------------------------------------------------------------------------------------------
# weight-only quantized matmul
# ------------------------------------------------------------------------------------------------


def _padded_qw(qw: QuantizedWeight, Kp: int, Np: int) -> QuantizedWeight:
    """Pad the leaves (zeros: finite, contribute nothing because x/dy are zero-padded) to Kp x Np."""
    g = qw.group_size
    div = 2 if qw.packed else 1
    s_rows = 1 if g is None else Kp // g
    return QuantizedWeight(
        data=pad_to(qw.data, (Kp // div, Np)),
        scales=pad_to(qw.scales, (s_rows, Np)),
        zeros=None if qw.zeros is None else pad_to(qw.zeros, (s_rows, Np)),
        dq_scales=None if qw.dq_scales is None else pad_to(qw.dq_scales, (s_rows, qw.dq_scales.shape[1])),
        dq_mean=qw.dq_mean,
        fmt=qw.fmt,
        shape=qw.shape,
        group_size=g,
        symmetric=qw.symmetric,
        double_quant=qw.double_quant,
    )


def _qmm_forward(x, qw, backend, bs):
    if x.size == 0:
        return jnp.zeros(x.shape[:-1] + (qw.shape[1],), x.dtype)
    if backend == "reference":
        return reference.quantized_matmul(x, qw)
    if backend in ("tpu", "tpu_interpret"):
        K, N = qw.shape
        out = mosaic_tpu.quantized_matmul(x.reshape(-1, K), qw, backend == "tpu_interpret")
        return out.reshape(x.shape[:-1] + (N,))
    K, N = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    b = triton_matmul.weight_only_blocks(qw, M, bs)
    Mp, Np = round_up(M, b.block_m), round_up(N, b.block_n)
    Kp = round_up(qw.padded_K, b.block_k)
    xp = pad_to(x2, (Mp, Kp))
    qp = _padded_qw(qw, Kp, Np)
    out = triton_matmul.weight_only_matmul(
        xp,
        qp,
        bm=b.block_m,
        bn=b.block_n,
        bk=b.block_k,
        split_k=b.split_k,
        interpret=(backend == "interpret"),
        num_warps=b.num_warps,
        num_stages=b.num_stages,
    )
    if b.split_k > 1:
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out[:M, :N].reshape(lead + (N,))


def _qmm_backward(dy, qw, backend, bs):
    if dy.size == 0:
        return jnp.zeros(dy.shape[:-1] + (qw.shape[0],), dy.dtype)
    if backend == "reference":
        return reference.quantized_matmul_t(dy, qw)
    if backend in ("tpu", "tpu_interpret"):
        K, N = qw.shape
        dx = mosaic_tpu.quantized_matmul_t(dy.reshape(-1, N), qw, backend == "tpu_interpret")
        return dx.reshape(dy.shape[:-1] + (K,))
    K, N = qw.shape
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, N)
    M = dy2.shape[0]
    b = triton_matmul.weight_only_t_blocks(qw, M, bs)
    Mp, Np = round_up(M, b.block_m), round_up(N, b.block_n)
    Kp = round_up(qw.padded_K, b.block_k)
    dyp = pad_to(dy2, (Mp, Np))
    qp = _padded_qw(qw, Kp, Np)
    dx = triton_matmul.weight_only_matmul_t(
        dyp, qp, bm=b.block_m, bn=b.block_n, bk=b.block_k, interpret=(backend == "interpret"), num_warps=b.num_warps, num_stages=b.num_stages
    )
    return dx[:M, :K].reshape(lead + (K,))


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmm(x, qw, backend, bs):
    return _qmm_forward(x, qw, backend, bs)


def _qmm_fwd(x, qw, backend, bs):
    return _qmm_forward(x, qw, backend, bs), qw


def _qmm_bwd(backend, bs, qw, dy):
    dx = _qmm_backward(dy, qw, backend, bs)
    return dx, jax.tree_util.tree_map(_zero_cotangent, qw)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x, qw: QuantizedWeight, *, backend: str = "auto", block_sizes=None):
    """``x [..., K] @ W [K, N]`` with W given as a ``QuantizedWeight``; output in x's dtype.

    Dequantization is fused in the kernel (W stays packed in HBM). Differentiable wrt x
    (dx = dy @ W^T by a fused transposed kernel); the weight's cotangent is zero (float0 for
    integer leaves). ``block_sizes`` (Triton kernels; the TPU kernels choose their own): None,
    ``(block_m, block_n, block_k[, split_k])`` or a dict with keys block_m, block_n, block_k, split_k,
    num_warps, num_stages (powers of two, blocks >= 16; ``block_k`` a multiple of the group size; ``split_k`` dividing the
    number of K blocks; default split_k grows until there are >= 264 programs). Shapes that are not
    block multiples are padded internally (the weight leaves are padded per call only when K/N are
    not multiples of the blocks).
    """
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qw: got {type(qw).__name__}, expected a QuantizedWeight from quantize()")
    if len(qw.shape) != 2:
        raise ValueError(f"qw: got a weight of shape {qw.shape}, expected a 2-D [K, N] weight (index batched weights first)")
    llm_int8.check_x(x, qw.shape[0])
    backend = _resolve_backend(backend)
    bs = triton_matmul.MatmulBlocks.from_arg(block_sizes)
    return _qmm(x, qw, backend, bs)


# ------------------------------------------------------------------------------------------------
# W8A8 (LLM.int8())
# ------------------------------------------------------------------------------------------------


def _w8a8_dispatch(xq, sx, wq, sw, out_dtype, backend, bs):
    if xq.shape[0] == 0:
        return jnp.zeros((0, wq.shape[1]), out_dtype)
    if backend == "reference":
        return reference.w8a8_core(xq, sx, wq, sw, out_dtype)
    if backend in ("tpu", "tpu_interpret"):
        return mosaic_tpu.int8_matmul(xq, sx, wq, sw, out_dtype, backend == "tpu_interpret")
    M, K = xq.shape
    N = wq.shape[1]
    b, k_major = triton_matmul.w8a8_blocks(M, N, K, bs)
    Mp, Np, Kp = round_up(M, b.block_m), round_up(N, b.block_n), round_up(K, b.block_k)
    wp = pad_to(wq.T, (Np, Kp)) if k_major else pad_to(wq, (Kp, Np))
    out = triton_matmul.w8a8_matmul(
        pad_to(xq, (Mp, Kp)),
        pad_to(sx, (Mp, 1)),
        wp,
        pad_to(sw, (1, Np)),
        bm=b.block_m,
        bn=b.block_n,
        bk=b.block_k,
        out_dtype=jnp.dtype(out_dtype),
        interpret=(backend == "interpret"),
        num_warps=b.num_warps,
        num_stages=b.num_stages,
        k_major=k_major,
    )
    return out[:M, :N]


def int8_matmul(x, w, *, outlier_threshold=None, max_outliers: int | None = None, backend: str = "auto", block_sizes=None):
    """W8A8 matmul (LLM.int8()): ``x [..., K] @ w [K, N]`` -> ``[..., N]`` in x's dtype.

    Rows of x and columns of W are scaled by their absmax to 127; the kernel does int8 x int8 with
    int32 accumulation and dequantizes by ``absmax_x[m] * absmax_w[n] / 127**2``.

    Args:
      x: float activations ``[..., K]``.
      w: either a float ``[K, N]`` weight (quantized per column on the fly), or a prepared
        ``quantize(w, "int8")`` QuantizedWeight (per-channel, symmetric: ``scales = absmax / 127``).
      outlier_threshold: None = plain int8. A float (or True = 6.0, the LLM.int8() default): feature
        columns of x where any ``|x| >= threshold`` go through a 16-bit matmul
        ``x[:, outliers] @ W[outliers, :]`` (in x's dtype if 16-bit, else float32; fp32 accumulation)
        and the rest through int8; the two outputs add. With a float W, the outlier rows of W are
        also excluded from W's int8 column scales; with a prepared int8 W the outlier rows come from
        the int8 weight (only the activation side is kept in high precision).
      max_outliers: static cap on the number of outlier columns (the shapes must be static under
        jit); default ``min(K, max(16, K // 64))``. Outlier columns beyond the cap (lowest-index
        first are kept) stay in the int8 path.
      backend, block_sizes: as for ``quantized_matmul``.

    Not differentiable (rounding); use ``quantized_matmul`` for training.
    """
    K, N, outlier_threshold, max_outliers = llm_int8.check_args(x, w, outlier_threshold, max_outliers)
    backend = _resolve_backend(backend)
    bs = triton_matmul.MatmulBlocks.from_arg(block_sizes)
    xq, sx, wq, sw, out_extra = llm_int8.prepare(x, w, outlier_threshold, max_outliers)
    out = _w8a8_dispatch(xq, sx, wq, sw, jnp.float32, backend, bs)
    if out_extra is not None:
        out = out + out_extra
    return out.astype(x.dtype).reshape(x.shape[:-1] + (N,))
