"""Public quantized-matmul API and backend dispatch.

Backends: "gpu" (Pallas on Triton), "interpret" (the same Triton-backend kernels with
``interpret=True``, runs on CPU), "tpu" (Pallas Mosaic TPU kernels, ``mosaic_tpu.py``; not yet run on
TPU hardware), "tpu_interpret" (the TPU kernels under ``pltpu.InterpretParams()``, runs on CPU),
"reference" (pure jnp dequantize-then-matmul), "auto" (gpu on GPU, tpu on TPU, interpret otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._backend import resolve_backend

from . import reference
from .formats import QuantizedWeight

BACKENDS = ("auto", "gpu", "tpu", "interpret", "tpu_interpret", "reference")
DEFAULT_OUTLIER_THRESHOLD = 6.0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str) -> str:
    return resolve_backend(backend, BACKENDS)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _is_pow2(v) -> bool:
    return isinstance(v, (int, np.integer)) and v > 0 and (v & (v - 1)) == 0


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


_BS_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")


def _normalize_block_sizes(block_sizes) -> tuple:
    """None | (bm, bn, bk[, split_k]) | dict with keys in ``_BS_KEYS`` (bm/bn/bk also accepted)
    -> 6-tuple (block_m, block_n, block_k, split_k, num_warps, num_stages), None = default."""
    if block_sizes is None:
        return (None,) * 6
    if isinstance(block_sizes, Mapping):
        alias = {k: i for i, k in enumerate(_BS_KEYS)} | {"bm": 0, "bn": 1, "bk": 2}
        out = [None] * 6
        for k, v in block_sizes.items():
            if k not in alias:
                raise ValueError(f"block_sizes: unknown key {k!r}, expected one of {_BS_KEYS}")
            out[alias[k]] = v
        bs = tuple(out)
    else:
        bs = tuple(block_sizes)
        if len(bs) not in (3, 4):
            raise ValueError(f"block_sizes: got {block_sizes!r}, expected (block_m, block_n, block_k[, split_k])")
        bs = bs + (None,) * (6 - len(bs))
    for name, v in zip(_BS_KEYS[:3], bs):
        if v is not None and (not _is_pow2(v) or v < 16):
            raise ValueError(f"block_sizes: {name}={v!r}, expected a power of two >= 16")
    for name, v in zip(_BS_KEYS[3:5], bs[3:5]):
        if v is not None and not _is_pow2(v):
            raise ValueError(f"block_sizes: {name}={v!r}, expected a power of two >= 1")
    if bs[5] is not None and not (isinstance(bs[5], (int, np.integer)) and bs[5] >= 1):
        raise ValueError(f"block_sizes: num_stages={bs[5]!r}, expected an int >= 1")
    return tuple(None if v is None else int(v) for v in bs)


def _triton_opts(bs, num_warps: int) -> dict:
    return dict(num_warps=bs[4] or num_warps, num_stages=bs[5] or 3)


def _default_bm(M: int) -> int:
    return min(128, max(16, _next_pow2(M)))


def _pad_to(a, shape):
    pads = [(0, t - s) for s, t in zip(a.shape, shape)]
    if all(p == (0, 0) for p in pads):
        return a
    return jnp.pad(a, pads)


def _check_x(x, K, what="x"):
    if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"{what}: got shape {tuple(getattr(x, 'shape', ()))}, expected [..., {K}] (last dim = K of the weight)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what}: got dtype {x.dtype} with shape {tuple(x.shape)}, expected a floating dtype")


# ------------------------------------------------------------------------------------------------
# weight-only quantized matmul
# ------------------------------------------------------------------------------------------------


# Aim for at least this many programs (~2 waves on an H100/H200 with 132 SMs) by splitting K
# when M and N give too few (decode shapes).
_TARGET_PROGRAMS = 264
_MAX_SPLIT_K = 16


def _wo_blocks(qw: QuantizedWeight, M: int, bs: tuple) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, split_k) for the forward weight-only kernel; checks user values."""
    bm, bn, bk, sk = bs[:4]
    K, N = qw.shape
    g = qw.group_size
    bm = bm or _default_bm(M)
    bn = bn or min(128 if M > 64 else 64, max(16, _next_pow2(N)))
    if g is None:
        bk = bk or min(128, max(16, _next_pow2(K)))
    else:
        if bk is None:  # two 64-row groups per K step when that needs no padding
            bk = 128 if (g < 128 and qw.padded_K % 128 == 0) else g
        if bk % g:
            raise ValueError(f"block_sizes: block_k={bk} must be a multiple of the group size {g} of qw")
    if qw.double_quant and bn > 256:
        raise ValueError(f"block_sizes: block_n={bn} must be <= 256 for double-quantized nf4")
    n_steps = _round_up(qw.padded_K, bk) // bk
    if sk is None:
        programs = (_round_up(M, bm) // bm) * (_round_up(N, bn) // bn)
        sk = 1
        while sk < _MAX_SPLIT_K and programs * sk < _TARGET_PROGRAMS and n_steps % (2 * sk) == 0:
            sk *= 2
    elif n_steps % sk:
        raise ValueError(f"block_sizes: split_k={sk} must divide the number of K blocks {n_steps} (K={K}, block_k={bk})")
    return bm, bn, bk, sk


def _padded_qw(qw: QuantizedWeight, Kp: int, Np: int) -> QuantizedWeight:
    """Pad the leaves (zeros: finite, contribute nothing because x/dy are zero-padded) to Kp x Np."""
    g = qw.group_size
    div = 2 if qw.packed else 1
    s_rows = 1 if g is None else Kp // g
    return QuantizedWeight(
        data=_pad_to(qw.data, (Kp // div, Np)),
        scales=_pad_to(qw.scales, (s_rows, Np)),
        zeros=None if qw.zeros is None else _pad_to(qw.zeros, (s_rows, Np)),
        dq_scales=None if qw.dq_scales is None else _pad_to(qw.dq_scales, (s_rows, qw.dq_scales.shape[1])),
        dq_mean=qw.dq_mean,
        fmt=qw.fmt, shape=qw.shape, group_size=g, symmetric=qw.symmetric, double_quant=qw.double_quant)


# ---- TPU (Mosaic) block choice: Mosaic wants blocks whose last two dims are multiples of (8, 128)
# or the full array dims; a K block holds 8 groups (sublane-aligned scale rows) or all of K.


def _tpu_dim(n: int, cap: int) -> tuple[int, int]:
    """(block, padded size) for a dim of size n: the full dim when n <= cap, else ``cap`` blocks."""
    if n <= cap:
        return n, n
    return cap, _round_up(n, cap)


def _tpu_n(N: int) -> tuple[int, int]:
    for b in (256, 128):
        if N % b == 0:
            return b, N
    if N <= 512:
        return N, N
    return 128, _round_up(N, 128)


def _tpu_weight_args(qw: QuantizedWeight, bk_unit: int, bn_np):
    from .formats import absmax_of

    K0 = qw.padded_K
    bk, Kp = _tpu_dim(K0, bk_unit)
    bn, Np = bn_np
    g = qw.group_size
    div = 2 if qw.packed else 1
    s_rows = 1 if g is None else Kp // g
    data = _pad_to(qw.data, (Kp // div, Np))
    scales = _pad_to(absmax_of(qw), (s_rows, Np))
    zeros = None if qw.zeros is None else _pad_to(qw.zeros.astype(jnp.float32), (s_rows, Np))
    return data, scales, zeros, bk, Kp


def _tpu_forward(x2, qw, interpret):
    from . import mosaic_tpu

    M = x2.shape[0]
    K, N = qw.shape
    unit = 512 if qw.group_size is None else 8 * qw.group_size
    bn, Np = _tpu_n(N)
    data, scales, zeros, bk, Kp = _tpu_weight_args(qw, unit, (bn, Np))
    bm, Mp = _tpu_dim(M, 256)
    out = mosaic_tpu.weight_only_matmul(_pad_to(x2, (Mp, Kp)), data, scales, zeros, fmt=qw.fmt, g=qw.group_size,
                                        bm=bm, bn=bn, bk=bk, interpret=interpret)
    return out[:M, :N]


def _tpu_backward(dy2, qw, interpret):
    from . import mosaic_tpu

    M = dy2.shape[0]
    K, N = qw.shape
    unit = 512 if qw.group_size is None else 8 * qw.group_size
    bn, Np = _tpu_n(N)
    data, scales, zeros, bk, Kp = _tpu_weight_args(qw, unit, (bn, Np))
    bm, Mp = _tpu_dim(M, 256)
    dx = mosaic_tpu.weight_only_matmul_t(_pad_to(dy2, (Mp, Np)), data, scales, zeros, fmt=qw.fmt,
                                         g=qw.group_size, bm=bm, bn=bn, bk=bk, interpret=interpret)
    return dx[:M, :K]


def _qmm_forward(x, qw, backend, bs):
    if x.size == 0:
        return jnp.zeros(x.shape[:-1] + (qw.shape[1],), x.dtype)
    if backend == "reference":
        return reference.quantized_matmul(x, qw)
    if backend in ("tpu", "tpu_interpret"):
        K, N = qw.shape
        out = _tpu_forward(x.reshape(-1, K), qw, backend == "tpu_interpret")
        return out.reshape(x.shape[:-1] + (N,))
    from . import triton_matmul

    K, N = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    bm, bn, bk, sk = _wo_blocks(qw, M, bs)
    Mp, Np = _round_up(M, bm), _round_up(N, bn)
    Kp = _round_up(qw.padded_K, bk)
    xp = _pad_to(x2, (Mp, Kp))
    qp = _padded_qw(qw, Kp, Np)
    out = triton_matmul.weight_only_matmul(xp, qp, bm=bm, bn=bn, bk=bk, split_k=sk,
                                           interpret=(backend == "interpret"), **_triton_opts(bs, 4))
    if sk > 1:
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out[:M, :N].reshape(lead + (N,))


def _qmm_backward(dy, qw, backend, bs):
    if dy.size == 0:
        return jnp.zeros(dy.shape[:-1] + (qw.shape[0],), dy.dtype)
    if backend == "reference":
        return reference.quantized_matmul_t(dy, qw)
    if backend in ("tpu", "tpu_interpret"):
        K, N = qw.shape
        dx = _tpu_backward(dy.reshape(-1, N), qw, backend == "tpu_interpret")
        return dx.reshape(dy.shape[:-1] + (K,))
    from . import triton_matmul

    K, N = qw.shape
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, N)
    M = dy2.shape[0]
    bm, bn, bk, _ = _wo_blocks(qw, M, bs)
    if qw.group_size is not None:
        bk = qw.group_size  # one group per output block of dx
    Mp, Np = _round_up(M, bm), _round_up(N, bn)
    Kp = _round_up(qw.padded_K, bk)
    dyp = _pad_to(dy2, (Mp, Np))
    qp = _padded_qw(qw, Kp, Np)
    dx = triton_matmul.weight_only_matmul_t(dyp, qp, bm=bm, bn=bn, bk=bk, interpret=(backend == "interpret"),
                                            **_triton_opts(bs, 4))
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
    _check_x(x, qw.shape[0])
    backend = _resolve_backend(backend)
    bs = _normalize_block_sizes(block_sizes)
    return _qmm(x, qw, backend, bs)


# ------------------------------------------------------------------------------------------------
# W8A8 (LLM.int8())
# ------------------------------------------------------------------------------------------------


def _absmax_quant(a, axis):
    """Symmetric int8 with absmax -> 127 along ``axis``; returns (q int8, scale = absmax / 127, keepdims)."""
    amax = jnp.max(jnp.abs(a), axis=axis, keepdims=True)
    scale = amax / 127.0
    q = jnp.clip(jnp.round(a / jnp.where(scale > 0, scale, 1.0)), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


def _w8a8_dispatch(xq, sx, wq, sw, out_dtype, backend, bs):
    if xq.shape[0] == 0:
        return jnp.zeros((0, wq.shape[1]), out_dtype)
    if backend == "reference":
        return reference.w8a8_core(xq, sx, wq, sw, out_dtype)
    if backend in ("tpu", "tpu_interpret"):
        from . import mosaic_tpu

        M, K = xq.shape
        N = wq.shape[1]
        bm, Mp = _tpu_dim(M, 256)
        bn, Np = _tpu_n(N)
        bk, Kp = _tpu_dim(K, 512)
        out = mosaic_tpu.w8a8_matmul(
            _pad_to(xq, (Mp, Kp)), _pad_to(sx, (Mp, 1)), _pad_to(wq, (Kp, Np)), _pad_to(sw, (1, Np)),
            bm=bm, bn=bn, bk=bk, out_dtype=jnp.dtype(out_dtype), interpret=(backend == "tpu_interpret"))
        return out[:M, :N]
    from . import triton_matmul

    M, K = xq.shape
    N = wq.shape[1]
    bm, bn, bk = bs[:3]
    bm = bm or _default_bm(M)
    bn = bn or min(128, max(16, _next_pow2(N)))
    bk = bk or min(128, max(32, _next_pow2(K)))
    Mp, Np, Kp = _round_up(M, bm), _round_up(N, bn), _round_up(K, bk)
    out = triton_matmul.w8a8_matmul(
        _pad_to(xq, (Mp, Kp)), _pad_to(sx, (Mp, 1)), _pad_to(wq, (Kp, Np)), _pad_to(sw, (1, Np)),
        bm=bm, bn=bn, bk=bk, out_dtype=jnp.dtype(out_dtype), interpret=(backend == "interpret"),
        **_triton_opts(bs, 8 if bm * bn >= 128 * 128 else 4))
    return out[:M, :N]


def int8_matmul(x, w, *, outlier_threshold=None, max_outliers: int | None = None, backend: str = "auto",
                block_sizes=None):
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
    if isinstance(w, QuantizedWeight):
        if w.fmt != "int8" or w.group_size is not None or not w.symmetric or len(w.shape) != 2:
            raise ValueError(f"w: got QuantizedWeight(fmt={w.fmt!r}, group_size={w.group_size}, symmetric={w.symmetric}, "
                             f"shape={w.shape}), expected quantize(w, 'int8') (2-D, per-channel, symmetric)")
        K, N = w.shape
    else:
        if not hasattr(w, "ndim") or w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"w: got shape {tuple(getattr(w, 'shape', ()))} dtype {getattr(w, 'dtype', None)}, "
                             "expected a float [K, N] weight or quantize(w, 'int8')")
        K, N = w.shape
    _check_x(x, K)
    if outlier_threshold is True:
        outlier_threshold = DEFAULT_OUTLIER_THRESHOLD
    if outlier_threshold is not None and not (isinstance(outlier_threshold, (int, float)) and outlier_threshold > 0):
        raise ValueError(f"outlier_threshold: got {outlier_threshold!r}, expected None, True or a positive float")
    if max_outliers is None:
        max_outliers = min(K, max(16, K // 64))
    if not isinstance(max_outliers, (int, np.integer)) or not 1 <= max_outliers <= K:
        raise ValueError(f"max_outliers: got {max_outliers!r}, expected an int in [1, K={K}]")
    backend = _resolve_backend(backend)
    bs = _normalize_block_sizes(block_sizes)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).astype(jnp.float32)
    prepared = isinstance(w, QuantizedWeight)
    wf = None if prepared else w.astype(jnp.float32)
    out_extra = None
    if outlier_threshold is not None:
        is_out = jnp.max(jnp.abs(x2), axis=0) >= outlier_threshold  # [K]
        idx = jnp.nonzero(is_out, size=int(max_outliers), fill_value=0)[0]
        valid = jnp.arange(int(max_outliers)) < jnp.sum(is_out)
        sel = jnp.zeros((K,), jnp.int32).at[idx].add(valid.astype(jnp.int32)) > 0
        hp = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
        x_o = jnp.where(valid[None, :], x2[:, idx], 0.0).astype(hp)
        if prepared:
            w_rows = w.data[idx].astype(jnp.float32) * w.scales
        else:
            w_rows = wf[idx]
        w_o = jnp.where(valid[:, None], w_rows, 0.0).astype(hp)
        # 16-bit operands, fp32 products/accumulation (exact products, so done as an f32 dot: XLA:CPU
        # has no bf16 x bf16 -> f32 dot).
        out_extra = jnp.matmul(x_o.astype(jnp.float32), w_o.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
        x2 = jnp.where(sel[None, :], 0.0, x2)
        if not prepared:
            wf = jnp.where(sel[:, None], 0.0, wf)
    xq, sx = _absmax_quant(x2, axis=1)
    if prepared:
        wq, sw = w.data, w.scales.astype(jnp.float32)
    else:
        wq, sw = _absmax_quant(wf, axis=0)
    out = _w8a8_dispatch(xq, sx, wq, sw, jnp.float32, backend, bs)
    if out_extra is not None:
        out = out + out_extra
    return out.astype(x.dtype).reshape(lead + (N,))
