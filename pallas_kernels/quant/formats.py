"""Quantized weight formats: the ``QuantizedWeight`` pytree, ``quantize`` and ``dequantize``.

All formats quantize a weight ``w`` of shape ``[..., K, N]`` (used as ``x @ W``) along the
contraction axis ``K`` (``axis=-2``; for a 2-D weight that is ``axis=0``). Leading batch dims
(e.g. stacked layers ``[L, K, N]``) are supported by ``quantize``/``dequantize``; the matmul
kernels take 2-D weights.

Layouts (``Kp`` is ``K`` padded up to a multiple of ``group_size`` with zero weights; ``G = Kp // group_size``):

* ``int8``, per-channel (``group_size=None``): ``data`` int8 ``[K, N]`` (uint8 when asymmetric),
  ``scales`` f32 ``[1, N]`` (``w ~= (q - zero) * scale``), ``zeros`` uint8 ``[1, N]`` if asymmetric.
* ``int8``, per-group: ``data`` ``[Kp, N]``, ``scales``/``zeros`` ``[G, N]``.
* ``int4``: per-group only. ``data`` uint8 ``[Kp // 2, N]``: two 4-bit codes per byte along K. Inside each
  group of ``g`` rows, byte ``j`` holds row ``j`` in its low nibble and row ``j + g // 2`` in its high
  nibble, so a kernel tile unpacks a group with one mask and one shift and no interleave.
  Symmetric: code = q + 8 with q in [-7, 7], ``scales = absmax / 7``. Asymmetric: code in [0, 15],
  ``zeros`` uint8 ``[G, N]`` (integer zero points), ``scales = (max - min) / 15``.
* ``nf4`` (QLoRA NormalFloat4): packed like int4 with ``group_size=64``; code indexes ``NF4_CODEBOOK``;
  ``scales`` f32 ``[G, N]`` = blockwise absmax. With ``double_quant=True`` the absmax constants minus
  their mean are quantized to int8 in blocks of 256 consecutive constants along N (row-major, so
  exactly "blocks of 256 of the flattened constants" when N % 256 == 0): ``scales`` int8 ``[G, N]``,
  ``dq_scales`` f32 ``[G, ceil(N / 256)]``, ``dq_mean`` f32 ``[]``;
  ``absmax ~= scales * dq_scales[:, n // 256] + dq_mean``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._util import is_pow2, round_up

__all__ = ["NF4_CODEBOOK", "QuantizedWeight", "quantize", "dequantize", "FORMATS"]

FORMATS = ("int8", "int4", "nf4")

# The 16 NormalFloat4 values published with QLoRA (Dettmers et al. 2023): quantiles of N(0, 1)
# normalized to [-1, 1], 8 positive / 7 negative values and an exact zero.
NF4_CODEBOOK_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_CODEBOOK = np.asarray(NF4_CODEBOOK_VALUES, dtype=np.float32)
NF4_CODEBOOK.setflags(write=False)

NF4_BLOCK = 64
DQ_BLOCK = 256
DEFAULT_INT4_GROUP = 64


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[..., K, N]`` weight. Pytree: array fields are leaves, the rest is static.

    Leaves (``None`` when unused): ``data``, ``scales``, ``zeros``, ``dq_scales``, ``dq_mean``.
    Static: ``fmt`` ("int8" | "int4" | "nf4"), ``shape`` (logical unpadded shape), ``group_size``
    (None = per-channel, int8 only), ``symmetric``, ``double_quant``.
    """

    data: Any
    scales: Any
    zeros: Any = None
    dq_scales: Any = None
    dq_mean: Any = None
    fmt: str = "int8"
    shape: tuple[int, ...] = ()
    group_size: int | None = None
    symmetric: bool = True
    double_quant: bool = False

    @property
    def nbytes(self) -> int:
        """Total bytes of all array leaves (packed data, scales, zero points, double-quant constants)."""
        return int(sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self)))

    @property
    def num_params(self) -> int:
        return int(math.prod(self.shape))

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / self.num_params

    @property
    def K(self) -> int:
        return self.shape[-2]

    @property
    def N(self) -> int:
        return self.shape[-1]

    @property
    def packed(self) -> bool:
        return self.fmt in ("int4", "nf4")

    @property
    def padded_K(self) -> int:
        if self.group_size is None:
            return self.K
        return round_up(self.K, self.group_size)


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["data", "scales", "zeros", "dq_scales", "dq_mean"],
    meta_fields=["fmt", "shape", "group_size", "symmetric", "double_quant"],
)


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


def quantize(w, fmt: str, *, axis: int = -2, group_size: int | None = None, symmetric: bool = True, double_quant: bool = False) -> QuantizedWeight:
    """Quantize a weight ``w [..., K, N]`` (matmul ``x @ W``) along its contraction axis K.

    Args:
      w: float weight, 2-D ``[K, N]`` or with leading batch dims ``[..., K, N]``.
      fmt: "int8", "int4" or "nf4".
      axis: the contraction axis K; only ``-2`` (default) or ``w.ndim - 2`` (i.e. ``0`` for a 2-D weight).
      group_size: int8: None = per output channel (default), else per-group along K.
        int4: default 64. nf4: default (and QLoRA) 64. Must be a power of two, >= 16 for int8 and
        >= 32 for int4/nf4 (the GPU kernel tiles one group per K step).
      symmetric: int8/int4 only; False adds integer zero points (uint8 ``zeros``). nf4 is symmetric.
      double_quant: nf4 only: quantize the absmax constants to int8 (blocks of 256) as in QLoRA.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: got {fmt!r}, expected one of {FORMATS}")
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"w: got shape {tuple(w.shape)}, expected a weight of shape [..., K, N] (ndim >= 2)")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w: got dtype {w.dtype} with shape {tuple(w.shape)}, expected a floating dtype")
    if axis not in (w.ndim - 2, -2):
        raise ValueError(
            f"axis: got {axis} for w of shape {tuple(w.shape)}, expected the contraction axis {w.ndim - 2} (or -2); transpose w to [..., K, N] first"
        )
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"w: got shape {tuple(w.shape)}, expected non-empty K and N")
    if fmt == "nf4":
        if not symmetric:
            raise ValueError("symmetric: nf4 is a symmetric (absmax) format, expected symmetric=True")
        group_size = NF4_BLOCK if group_size is None else group_size
    elif fmt == "int4":
        group_size = DEFAULT_INT4_GROUP if group_size is None else group_size
    if double_quant and fmt != "nf4":
        raise ValueError(f"double_quant: only supported for fmt='nf4', got fmt={fmt!r}")
    if group_size is not None:
        min_g = 16 if fmt == "int8" else 32
        if not isinstance(group_size, int) or not is_pow2(group_size) or group_size < min_g:
            raise ValueError(f"group_size: got {group_size!r} for fmt={fmt!r}, expected a power of two >= {min_g}")

    batch = w.shape[:-2]
    K, N = w.shape[-2:]
    w3 = w.reshape((-1, K, N)).astype(jnp.float32)
    leaves = _quantize_batched(w3, fmt, group_size, bool(symmetric), bool(double_quant))
    leaves = {k: (None if v is None else v.reshape(batch + v.shape[1:])) for k, v in leaves.items()}
    return QuantizedWeight(
        **leaves, fmt=fmt, shape=tuple(int(d) for d in w.shape), group_size=group_size, symmetric=bool(symmetric), double_quant=bool(double_quant)
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_batched(w3, fmt, g, symmetric, double_quant):
    return jax.vmap(lambda m: _quantize_2d(m, fmt, g, symmetric, double_quant))(w3)


def _safe(s):
    return jnp.where(s > 0, s, 1.0)


def _pack_nibbles(codes, g):
    """codes uint8 [Kp, N] in [0, 16) -> [Kp // 2, N]; per group: low = row j, high = row j + g/2."""
    Kp, N = codes.shape
    c = codes.reshape(Kp // g, 2, g // 2, N)
    packed = c[:, 0] | (c[:, 1] << 4)
    return packed.reshape(Kp // 2, N).astype(jnp.uint8)


def _unpack_nibbles(packed, g):
    Kh, N = packed.shape
    p = packed.reshape(Kh * 2 // g, 1, g // 2, N)
    lo = p & 0xF
    hi = p >> 4
    return jnp.concatenate([lo, hi], axis=1).reshape(Kh * 2, N)


def _quantize_2d(w, fmt, g, symmetric, double_quant):
    K, N = w.shape
    out = dict(zeros=None, dq_scales=None, dq_mean=None)
    if g is None:  # int8 per-channel
        wg = w.reshape(1, K, N)
    else:
        Kp = round_up(K, g)
        w = jnp.pad(w, ((0, Kp - K), (0, 0)))
        wg = w.reshape(Kp // g, g, N)
    if fmt in ("int8", "int4"):
        bits = 8 if fmt == "int8" else 4
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            amax = jnp.max(jnp.abs(wg), axis=1)  # [G, N]
            scale = amax / qmax
            q = jnp.clip(jnp.round(wg / _safe(scale)[:, None, :]), -qmax, qmax)
            if fmt == "int8":
                data = q.astype(jnp.int8)
            else:
                data = (q + 8).astype(jnp.uint8)
        else:
            levels = 2**bits - 1
            mn = jnp.minimum(jnp.min(wg, axis=1), 0.0)
            mx = jnp.maximum(jnp.max(wg, axis=1), 0.0)
            scale = (mx - mn) / levels
            zero = jnp.clip(jnp.round(-mn / _safe(scale)), 0, levels)
            q = jnp.clip(jnp.round(wg / _safe(scale)[:, None, :]) + zero[:, None, :], 0, levels)
            data = q.astype(jnp.uint8)
            out["zeros"] = zero.astype(jnp.uint8)
        data = data.reshape(-1, N)
        if fmt == "int4":
            data = _pack_nibbles(data, g)
        out["data"] = data
        out["scales"] = scale.astype(jnp.float32)
        return out
    # nf4
    amax = jnp.max(jnp.abs(wg), axis=1)  # [G, N]
    if double_quant:
        q8, s2, mean = _double_quant(amax)
        amax_used = _double_dequant(q8, s2, mean)
        out.update(scales=q8, dq_scales=s2, dq_mean=mean)
    else:
        amax_used = amax
        out["scales"] = amax.astype(jnp.float32)
    normed = jnp.clip(wg / _safe(amax_used)[:, None, :], -1.0, 1.0)
    cb = jnp.asarray(NF4_CODEBOOK)
    mids = (cb[1:] + cb[:-1]) / 2
    codes = jnp.searchsorted(mids, normed.reshape(-1, N), side="left").astype(jnp.uint8)
    out["data"] = _pack_nibbles(codes, g)
    return out


def _double_quant(amax):
    """amax f32 [G, N] -> (int8 [G, N], f32 scales [G, ceil(N/256)], f32 mean [])."""
    G, N = amax.shape
    nb = -(-N // DQ_BLOCK)
    mean = jnp.mean(amax)
    c = jnp.pad(amax - mean, ((0, 0), (0, nb * DQ_BLOCK - N))).reshape(G, nb, DQ_BLOCK)
    s2 = jnp.max(jnp.abs(c), axis=-1) / 127.0
    q = jnp.clip(jnp.round(c / _safe(s2)[..., None]), -127, 127).reshape(G, nb * DQ_BLOCK)[:, :N]
    return q.astype(jnp.int8), s2.astype(jnp.float32), mean.astype(jnp.float32)


def _double_dequant(q8, s2, mean):
    N = q8.shape[-1]
    s2_full = jnp.repeat(s2, DQ_BLOCK, axis=-1)[..., :N]
    return q8.astype(jnp.float32) * s2_full + mean[..., None, None]


# ----------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------


def absmax_of(qw: QuantizedWeight):
    """The per-group scale actually used by the kernels ([..., G, N] f32)."""
    if qw.fmt == "nf4" and qw.double_quant:
        return jax.vmap(_double_dequant)(*_flat_batch(qw.scales, qw.dq_scales, qw.dq_mean, nd=(2, 2, 0))).reshape(qw.scales.shape)
    return qw.scales.astype(jnp.float32)


def _flat_batch(*arrs, nd):
    return tuple(a.reshape((-1,) + a.shape[a.ndim - n :]) for a, n in zip(arrs, nd))


def dequantize(qw: QuantizedWeight, dtype=jnp.float32):
    """Return the dense ``[..., K, N]`` weight in ``dtype`` (computed in float32)."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qw: got {type(qw).__name__}, expected a QuantizedWeight")
    return _dequantize(qw, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(qw: QuantizedWeight, dtype):
    K, N = qw.shape[-2:]
    batch = qw.shape[:-2]
    scales = absmax_of(qw)
    g = qw.group_size
    data = qw.data.reshape((-1,) + qw.data.shape[-2:])
    scales = scales.reshape((-1,) + scales.shape[-2:])
    zeros = None if qw.zeros is None else qw.zeros.reshape((-1,) + qw.zeros.shape[-2:])

    def one(d, s, z):
        if qw.packed:
            codes = _unpack_nibbles(d, g)
            if qw.fmt == "nf4":
                vals = jnp.asarray(NF4_CODEBOOK)[codes.astype(jnp.int32)]
            else:
                zz = 8 if z is None else jnp.repeat(z.astype(jnp.int32), g, axis=0)
                vals = (codes.astype(jnp.int32) - zz).astype(jnp.float32)
        else:
            vals = d.astype(jnp.int32)
            if z is not None:
                vals = vals - (z.astype(jnp.int32) if g is None else jnp.repeat(z.astype(jnp.int32), g, axis=0))
            vals = vals.astype(jnp.float32)
        rows = vals.shape[0]
        s_full = s if g is None else jnp.repeat(s, g, axis=0)[:rows]
        return (vals * s_full)[:K]

    if zeros is None:
        out = jax.vmap(lambda d, s: one(d, s, None))(data, scales)
    else:
        out = jax.vmap(one)(data, scales, zeros)
    return out.reshape(batch + (K, N)).astype(dtype)
