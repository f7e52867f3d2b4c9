"""Pallas (Triton backend) kernels for quantized matmuls. ``interpret=True`` runs them on CPU.

Kernels (all 2-D; the api pads M/N/K to block multiples and slices the result):

* ``weight_only_matmul(x, qw)``: ``x [M, K] @ W [K, N]`` where W stays packed in HBM. Grid over
  (M blocks, N blocks); a ``fori_loop`` walks K one block at a time. Each step loads the packed
  bytes of the block, unpacks nibbles with a mask/shift, turns codes into values (``code - zero`` for
  int4/int8, a 4-level select tree over the 16 NF4 values for nf4), does the dot in the activation
  dtype with an fp32 accumulator and multiplies the group's partial product by the group's scale row
  (scales vary along K only per group, so scaling the [bm, bn] partial product is exact).
* ``weight_only_matmul_t(dy, qw)``: ``dy [M, N] @ W^T`` (the backward wrt x). Grid over
  (M blocks, K groups); loops over N, dequantizes the [group, bn] tile (scale varies along the
  contracted N here, so the tile is scaled before the dot) and contracts on N.
* ``w8a8_matmul(xq, sx, wq, sw)``: int8 x int8 with int32 accumulation
  (``preferred_element_type=jnp.int32``), dequantized in the epilogue by ``sx[m] * sw[n]``.

Nothing here imports jax_triton; ``jax.experimental.pallas.triton`` is jax's own module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._util import gpu_arch, is_pow2, next_pow2, round_up

from .formats import NF4_CODEBOOK_VALUES, QuantizedWeight


# ------------------------------------------------------------------------------------------------
# block sizes: the user's choice (MatmulBlocks) and the per-GPU defaults (TILES)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulBlocks:
    """Tiles and Triton parameters of one quantized matmul; None = this backend's default."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def from_arg(cls, block_sizes) -> "MatmulBlocks":
        """None | MatmulBlocks | ``(block_m, block_n, block_k[, split_k])`` | a dict of the fields
        (``bm``/``bn``/``bk`` also accepted); checks the values."""
        keys = [f.name for f in dataclasses.fields(cls)]
        if block_sizes is None:
            return cls()
        if isinstance(block_sizes, cls):
            bs = block_sizes
        elif isinstance(block_sizes, Mapping):
            alias = {"bm": "block_m", "bn": "block_n", "bk": "block_k"}
            unknown = [k for k in block_sizes if alias.get(k, k) not in keys]
            if unknown:
                raise ValueError(f"block_sizes: unknown key {unknown[0]!r}, expected one of {tuple(keys)}")
            bs = cls(**{alias.get(k, k): v for k, v in block_sizes.items()})
        else:
            vals = tuple(block_sizes)
            if len(vals) not in (3, 4):
                raise ValueError(f"block_sizes: got {block_sizes!r}, expected (block_m, block_n, block_k[, split_k])")
            bs = cls(*vals)
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(bs, name)
            if v is not None and (not is_pow2(v) or v < 16):
                raise ValueError(f"block_sizes: {name}={v!r}, expected a power of two >= 16")
        for name in ("split_k", "num_warps"):
            v = getattr(bs, name)
            if v is not None and not is_pow2(v):
                raise ValueError(f"block_sizes: {name}={v!r}, expected a power of two >= 1")
        if bs.num_stages is not None and not (isinstance(bs.num_stages, (int, np.integer)) and bs.num_stages >= 1):
            raise ValueError(f"block_sizes: num_stages={bs.num_stages!r}, expected an int >= 1")
        return dataclasses.replace(bs, **{f: int(getattr(bs, f)) for f in keys if getattr(bs, f) is not None})


@dataclasses.dataclass(frozen=True)
class Tile:
    block_n: int
    num_warps: int
    num_stages: int = 3
    k_major: bool = False  # W8A8 only: the weight goes in as W^T [N, K]


# Default tiles per GPU generation, kernel and M class ("small": block_m <= 64, decode-like;
# "large": block_m = 128). Checked for zero register spills at K = N = 4096, M = 16 and 4096, for
# every format, by experiments/check_sm90.py --arch 80/90/100 (not yet timed on a GPU):
# * M <= 64: the accumulator is at most [64, bn] fp32; 4 warps stay under ~130 registers (sm_90a).
# * M = 128 tiles with 4 warps spilled at sm_90a (int8 fwd/dx ~340 B, int4/NF4 fwd 1-2 KB: the
#   [bk, bn] dequantized tile is a register operand of the dot next to a [128, bn] fp32
#   accumulator). 8 warps halve both per thread: int8 176-194 registers, no spill; the packed
#   formats still spilled at bn=128 (NF4's select tree), so they take bn=64 (144-174 registers).
# * W8A8: int8 x int8 -> int32 at 128x128 with 8 warps (181 registers). At M >= 128 the weight goes
#   in K-major (W^T, transposed by XLA per call: K*N bytes, small next to the matmul at such M), so
#   its tiles are copied asynchronously; decode-sized M keeps [K, N] (the transpose would double the
#   weight traffic that bounds it).
_SM90 = {
    ("fwd", "small"): Tile(64, 4),
    ("fwd", "large"): Tile(128, 8),
    ("fwd_packed", "large"): Tile(64, 8),
    ("dx", "small"): Tile(64, 4),
    ("dx", "large"): Tile(128, 8),
    ("w8a8", "small"): Tile(128, 4),
    ("w8a8", "large"): Tile(128, 8, k_major=True),
}
# sm_80 (mma.sync fragments cost more registers than wgmma): the packed formats at M=128 spilled
# at bn=64 (NF4+double quant fwd 16 B, int4 g128 dx 660 B); bn=32 keeps them at 104-246 registers.
_SM80 = dict(_SM90)
_SM80[("fwd_packed", "large")] = Tile(32, 8)
_SM80[("dx_packed", "large")] = Tile(32, 8)
TILES = {80: _SM80, 90: _SM90, 100: _SM90}


def _tile(kernel: str, bm: int, packed: bool = False, arch: int | None = None) -> Tile:
    table = TILES[gpu_arch() if arch is None else arch]
    size = "small" if bm <= 64 else "large"
    key = (kernel + "_packed", size)
    return table[key] if packed and key in table else table[(kernel, size)]


def default_block_m(M: int) -> int:
    return min(128, max(16, next_pow2(M)))


# Aim for at least this many programs (~2 waves on an H100/H200 with 132 SMs) by splitting K
# when M and N give too few (decode shapes).
_TARGET_PROGRAMS = 264
_MAX_SPLIT_K = 16


def weight_only_blocks(qw: QuantizedWeight, M: int, bs: MatmulBlocks) -> MatmulBlocks:
    """Complete blocks for the forward weight-only kernel (user values checked, None filled)."""
    K, N = qw.shape
    g = qw.group_size
    bm = bs.block_m or default_block_m(M)
    tile = _tile("fwd", bm, qw.packed)
    bn = bs.block_n or min(tile.block_n, max(16, next_pow2(N)))
    bk = bs.block_k
    if g is None:
        bk = bk or min(128, max(16, next_pow2(K)))
    else:
        if bk is None:  # two 64-row groups per K step when that needs no padding
            bk = 128 if (g < 128 and qw.padded_K % 128 == 0) else g
        if bk % g:
            raise ValueError(f"block_sizes: block_k={bk} must be a multiple of the group size {g} of qw")
    if qw.double_quant and bn > 256:
        raise ValueError(f"block_sizes: block_n={bn} must be <= 256 for double-quantized nf4")
    n_steps = round_up(qw.padded_K, bk) // bk
    sk = bs.split_k
    if sk is None:
        programs = (round_up(M, bm) // bm) * (round_up(N, bn) // bn)
        sk = 1
        while sk < _MAX_SPLIT_K and programs * sk < _TARGET_PROGRAMS and n_steps % (2 * sk) == 0:
            sk *= 2
    elif n_steps % sk:
        raise ValueError(f"block_sizes: split_k={sk} must divide the number of K blocks {n_steps} (K={K}, block_k={bk})")
    return MatmulBlocks(bm, bn, bk, sk, bs.num_warps or tile.num_warps, bs.num_stages or tile.num_stages)


def weight_only_t_blocks(qw: QuantizedWeight, M: int, bs: MatmulBlocks) -> MatmulBlocks:
    """Complete blocks for the transposed kernel (dx = dy @ W^T): one group per output K block."""
    fwd = weight_only_blocks(qw, M, dataclasses.replace(bs, num_warps=None, num_stages=None))
    tile = _tile("dx", fwd.block_m, qw.packed)
    bk = fwd.block_k if qw.group_size is None else qw.group_size
    return MatmulBlocks(
        fwd.block_m,
        bs.block_n or min(tile.block_n, max(16, next_pow2(qw.shape[1]))),
        bk,
        1,
        bs.num_warps or tile.num_warps,
        bs.num_stages or tile.num_stages,
    )


def w8a8_blocks(M: int, N: int, K: int, bs: MatmulBlocks) -> tuple[MatmulBlocks, bool]:
    """(complete blocks, whether the weight goes in K-major) for the W8A8 kernel."""
    bm = bs.block_m or default_block_m(M)
    tile = _tile("w8a8", bm)
    bn = bs.block_n or min(tile.block_n, max(16, next_pow2(N)))
    bk = bs.block_k or min(128, max(32, next_pow2(K)))
    return MatmulBlocks(bm, bn, bk, 1, bs.num_warps or tile.num_warps, bs.num_stages or tile.num_stages), tile.k_major


_NT = (((1,), (1,)), ((), ()))  # contract last dims: a [m, k] . b [n, k] -> [m, n]
_NN = (((1,), (0,)), ((), ()))


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _precision(cdt):
    # f32 activations: ask for IEEE fp32 on GPU (Triton would otherwise use TF32).
    return lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None


def _dot(a, b, cdt, dims=_NN):
    return lax.dot_general(a, b, dims, precision=_precision(cdt), preferred_element_type=jnp.float32)


def _nf4_values(code):
    """code int32 in [0, 16) -> NF4 codebook value (f32) via a select tree on the 4 code bits."""
    bits = [(code & (1 << i)) != 0 for i in range(4)]
    level = [jnp.where(bits[0], NF4_CODEBOOK_VALUES[2 * i + 1], NF4_CODEBOOK_VALUES[2 * i]) for i in range(8)]
    for b in bits[1:]:
        level = [jnp.where(b, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _codes_to_values(codes_u8, fmt, zero_row):
    """Unpacked codes (uint8 / int8 tile) -> integer-valued or NF4 values (int32 or f32)."""
    if fmt == "nf4":
        return _nf4_values(codes_u8.astype(jnp.int32))
    v = codes_u8.astype(jnp.int32)
    if zero_row is not None:
        v = v - zero_row
    return v


def _scale_row(s_ref, s2_ref, mean_ref, r, c0, bn, dq):
    """Scale row r (shape [1, bn] f32) for the weight columns held by the block."""
    s = s_ref[pl.ds(r, 1), pl.ds(c0, bn)]
    if not dq:
        return s.astype(jnp.float32)
    s2 = s2_ref[pl.ds(r, 1), pl.ds(c0 // 256, 1)]  # [1, 1]: bn <= 256 divides 256
    return s.astype(jnp.float32) * s2 + mean_ref[...]


# ------------------------------------------------------------------------------------------------
# forward: x @ W
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, fmt, g, bk, n_steps, has_zeros, dq, cdt, bn):
    it = iter(refs)
    x_ref, d_ref, s_ref = next(it), next(it), next(it)
    z_ref = next(it) if has_zeros else None
    s2_ref, mean_ref = (next(it), next(it)) if dq else (None, None)
    o_ref = next(it)
    bm = x_ref.shape[0]
    packed = fmt in ("int4", "nf4")

    def zero_row(r):
        if has_zeros:
            return z_ref[pl.ds(r, 1), :].astype(jnp.int32)
        if fmt == "int4":
            return 8  # symmetric int4 codes are q + 8
        return None

    if g is None:  # int8 per output channel: one scale row, applied once at the end

        def body(k, acc):
            k0 = pl.multiple_of(k * bk, bk)
            xs = x_ref[:, pl.ds(k0, bk)].astype(cdt)
            v = _codes_to_values(d_ref[pl.ds(k0, bk), :], fmt, zero_row(0)) if has_zeros else d_ref[pl.ds(k0, bk), :]
            return acc + _dot(xs, v.astype(cdt), cdt)

        acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.float32))
        acc = acc * s_ref[pl.ds(0, 1), :].astype(jnp.float32)
        o_ref[...] = acc.astype(o_ref.dtype)
        return

    gps = bk // g  # groups per K step

    def body(k, acc):
        for j in range(gps):
            r = k * gps + j
            if packed:
                h = g // 2
                p = d_ref[pl.ds(pl.multiple_of(r * h, h), h), :]
                lo = _codes_to_values(p & 0xF, fmt, zero_row(r))
                hi = _codes_to_values(p >> 4, fmt, zero_row(r))
                x0 = pl.multiple_of(r * g, g)
                x_lo = x_ref[:, pl.ds(x0, h)].astype(cdt)
                x_hi = x_ref[:, pl.ds(x0 + h, h)].astype(cdt)
                part = _dot(x_lo, lo.astype(cdt), cdt) + _dot(x_hi, hi.astype(cdt), cdt)
            else:
                r0 = pl.multiple_of(r * g, g)
                q = d_ref[pl.ds(r0, g), :]
                v = _codes_to_values(q, fmt, zero_row(r)) if has_zeros else q
                part = _dot(x_ref[:, pl.ds(r0, g)].astype(cdt), v.astype(cdt), cdt)
            acc = acc + part * _scale_row(s_ref, s2_ref, mean_ref, r, 0, bn, dq)
        return acc

    acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "split_k", "interpret", "num_warps", "num_stages"))
def weight_only_matmul(x, qw: QuantizedWeight, *, bm: int, bn: int, bk: int, split_k: int = 1, interpret: bool, num_warps: int = 4, num_stages: int = 3):
    """x [Mp, Kp] @ W -> [Mp, Np] in x.dtype (split_k == 1) or f32 partial sums [split_k, Mp, Np].

    Already padded: Mp % bm == 0, Kp % (bk * split_k) == 0 with Kp the (padded) K of ``qw``, and the
    leaves of ``qw`` padded along N to a multiple of ``bn``. With ``split_k > 1`` program (i, j, s)
    reduces the s-th of ``split_k`` contiguous K ranges (more programs for small M: decode shapes);
    the caller sums the partials.
    """
    Mp, Kp = x.shape
    fmt, g = qw.fmt, qw.group_size
    Np = qw.data.shape[1]
    S = split_k
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    dq = bool(qw.double_quant)
    has_zeros = qw.zeros is not None
    d_rows = qw.data.shape[0] // S
    s_rows = qw.scales.shape[0] if g is None else qw.scales.shape[0] // S
    s_idx = (lambda i, j, s: (0, j)) if g is None else (lambda i, j, s: (s, j))  # noqa: E731
    in_specs = [pl.BlockSpec((bm, Kp // S), lambda i, j, s: (i, s)), pl.BlockSpec((d_rows, bn), lambda i, j, s: (s, j)), pl.BlockSpec((s_rows, bn), s_idx)]
    args = [x, qw.data, qw.scales]
    if has_zeros:
        in_specs.append(pl.BlockSpec((s_rows, bn), s_idx))
        args.append(qw.zeros)
    if dq:
        in_specs.append(pl.BlockSpec((s_rows, 1), lambda i, j, s: (s, (j * bn) // 256)))
        in_specs.append(pl.BlockSpec((1, 1), lambda i, j, s: (0, 0)))
        args += [qw.dq_scales, qw.dq_mean.reshape(1, 1)]
    kernel = functools.partial(_fwd_kernel, fmt=fmt, g=g, bk=bk, n_steps=Kp // bk // S, has_zeros=has_zeros, dq=dq, cdt=cdt, bn=bn)
    if S == 1:
        out_shape = jax.ShapeDtypeStruct((Mp, Np), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((S, Mp, Np), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(Mp // bm, Np // bn, S),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name=f"quant_{fmt}_matmul",
    )(*args)


# ------------------------------------------------------------------------------------------------
# backward wrt x: dy @ W^T
# ------------------------------------------------------------------------------------------------


def _bwd_kernel(*refs, fmt, g, bkt, bn, n_steps, has_zeros, dq, cdt):
    it = iter(refs)
    dy_ref, d_ref, s_ref = next(it), next(it), next(it)
    z_ref = next(it) if has_zeros else None
    s2_ref, mean_ref = (next(it), next(it)) if dq else (None, None)
    o_ref = next(it)
    bm = dy_ref.shape[0]
    packed = fmt in ("int4", "nf4")

    def tile(codes, c0):
        zr = None
        if has_zeros:
            zr = z_ref[pl.ds(0, 1), pl.ds(c0, bn)].astype(jnp.int32)
        elif fmt == "int4":
            zr = 8
        v = _codes_to_values(codes, fmt, zr).astype(jnp.float32)
        s = _scale_row(s_ref, s2_ref, mean_ref, 0, c0, bn, dq)
        return (v * s).astype(cdt)

    if packed:
        h = g // 2

        def body(n, carry):
            acc_lo, acc_hi = carry
            c0 = pl.multiple_of(n * bn, bn)
            dys = dy_ref[:, pl.ds(c0, bn)].astype(cdt)
            p = d_ref[:, pl.ds(c0, bn)]  # [h, bn]
            acc_lo = acc_lo + _dot(dys, tile(p & 0xF, c0), cdt, _NT)
            acc_hi = acc_hi + _dot(dys, tile(p >> 4, c0), cdt, _NT)
            return acc_lo, acc_hi

        z = jnp.zeros((bm, h), jnp.float32)
        acc_lo, acc_hi = lax.fori_loop(0, n_steps, body, (z, z))
        o_ref[:, pl.ds(0, h)] = acc_lo.astype(o_ref.dtype)
        o_ref[:, pl.ds(h, h)] = acc_hi.astype(o_ref.dtype)
    else:

        def body(n, acc):
            c0 = pl.multiple_of(n * bn, bn)
            dys = dy_ref[:, pl.ds(c0, bn)].astype(cdt)
            return acc + _dot(dys, tile(d_ref[:, pl.ds(c0, bn)], c0), cdt, _NT)

        acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bkt), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "interpret", "num_warps", "num_stages"))
def weight_only_matmul_t(dy, qw: QuantizedWeight, *, bm: int, bn: int, bk: int, interpret: bool, num_warps: int = 4, num_stages: int = 3):
    """dy [Mp, Np] @ W^T -> [Mp, Kp]. Padding as for ``weight_only_matmul``; grouped formats use one
    group per output K block, per-channel int8 uses ``bk`` (Kp % bk == 0)."""
    Mp, Np = dy.shape
    fmt, g = qw.fmt, qw.group_size
    Kp = qw.data.shape[0] * (2 if qw.packed else 1)
    cdt = dy.dtype if dy.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    dq = bool(qw.double_quant)
    has_zeros = qw.zeros is not None
    bkt = bk if g is None else g
    d_blk = bkt // 2 if qw.packed else bkt
    if g is None:
        s_map = lambda i, k: (0, 0)  # noqa: E731
    else:
        s_map = lambda i, k: (k, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((bm, Np), lambda i, k: (i, 0)), pl.BlockSpec((d_blk, Np), lambda i, k: (k, 0)), pl.BlockSpec((1, Np), s_map)]
    args = [dy, qw.data, qw.scales]
    if has_zeros:
        in_specs.append(pl.BlockSpec((1, Np), s_map))
        args.append(qw.zeros)
    if dq:
        in_specs.append(pl.BlockSpec((1, qw.dq_scales.shape[1]), s_map))
        in_specs.append(pl.BlockSpec((1, 1), lambda i, k: (0, 0)))
        args += [qw.dq_scales, qw.dq_mean.reshape(1, 1)]
    kernel = functools.partial(_bwd_kernel, fmt=fmt, g=g, bkt=bkt, bn=bn, n_steps=Np // bn, has_zeros=has_zeros, dq=dq, cdt=cdt)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Kp), dy.dtype),
        grid=(Mp // bm, Kp // bkt),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bkt), lambda i, k: (i, k)),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name=f"quant_{fmt}_matmul_t",
    )(*args)


# ------------------------------------------------------------------------------------------------
# W8A8
# ------------------------------------------------------------------------------------------------


def _w8a8_kernel(xq_ref, sx_ref, wq_ref, sw_ref, o_ref, *, bk, n_steps, k_major):
    bm, bn = o_ref.shape

    def body(k, acc):
        k0 = pl.multiple_of(k * bk, bk)
        a = xq_ref[:, pl.ds(k0, bk)]
        if k_major:  # W^T tile [bn, bk]: the K-contiguous operand 8-bit wgmma reads from shared memory
            b = wq_ref[:, pl.ds(k0, bk)]
            return acc + lax.dot_general(a, b, _NT, preferred_element_type=jnp.int32)
        b = wq_ref[pl.ds(k0, bk), :]
        return acc + lax.dot_general(a, b, _NN, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.int32))
    out = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "out_dtype", "interpret", "num_warps", "num_stages", "k_major"))
def w8a8_matmul(xq, sx, wq, sw, *, bm: int, bn: int, bk: int, out_dtype, interpret: bool, num_warps: int = 8, num_stages: int = 3, k_major: bool = False):
    """xq int8 [Mp, Kp], sx f32 [Mp, 1], wq int8 [Kp, Np], sw f32 [1, Np] -> (xq @ wq) * sx * sw.

    ``k_major``: wq is given transposed, ``[Np, Kp]`` (K contiguous). Hopper's 8-bit wgmma takes
    only K-major operands from shared memory, so a [K, N] weight tile is loaded synchronously and
    transposed through registers; a K-major tile is copied asynchronously (cp.async) instead.
    """
    Mp, Kp = xq.shape
    Np = wq.shape[0] if k_major else wq.shape[1]
    kernel = functools.partial(_w8a8_kernel, bk=bk, n_steps=Kp // bk, k_major=k_major)
    w_spec = pl.BlockSpec((bn, Kp), lambda i, j: (j, 0)) if k_major else pl.BlockSpec((Kp, bn), lambda i, j: (0, j))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, Np // bn),
        in_specs=[
            pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            w_spec,
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name="w8a8_matmul",
    )(xq, sx, wq, sw)
