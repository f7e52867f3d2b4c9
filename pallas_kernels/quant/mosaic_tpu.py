"""Pallas Mosaic (TPU) kernels for quantized matmuls. Checked on CPU with
``interpret=pltpu.InterpretParams()`` and by lowering to Mosaic (``jax.export`` for "tpu");
NOT yet run on TPU hardware.

TPU-specific choices (vs the Triton kernels):
  * grid (M blocks, N blocks, K blocks) with K last ("arbitrary") and an fp32 VMEM accumulator;
    BlockSpecs pipeline the packed weight tiles HBM -> VMEM.
  * a K block holds 8 groups (so the [groups, bn] scale block is sublane aligned), or all of K.
  * each weight tile is unpacked in 32-bit (uint8 -> int32, mask / shift), turned into values
    (``(code - zero) * scale`` or the NF4 select tree) and re-assembled into a [bk, bn] tile for
    one MXU dot. Zero points go in as f32 and the double-quantized NF4 absmax is expanded to f32 by
    the caller (1/16 byte per parameter of extra traffic).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._util import pad_to, round_up

from .formats import QuantizedWeight, absmax_of
from .triton_matmul import _nf4_values

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _params(interpret):
    return pltpu.InterpretParams() if interpret else False


def _cparams(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


def _tile(d, s, z, *, fmt, g, sym_int4):
    """Dequantize one weight tile in VMEM -> f32 [bk, bn].

    d: int8/uint8 [bk, bn] or packed uint8 [bk // 2, bn]; s: f32 scale rows [bk // g, bn]
    (or [1, bn] per-channel); z: f32 zero rows like s, or None.
    """
    if fmt in ("int4", "nf4"):
        rows, bn = d.shape
        h = g // 2
        p = d.astype(jnp.int32).reshape(rows // h, h, bn)
        codes = jnp.concatenate([p & 15, p >> 4], axis=1)  # [groups, g, bn]
        v = _nf4_values(codes) if fmt == "nf4" else codes.astype(jnp.float32)
        if sym_int4:
            v = v - 8.0
        elif z is not None:
            v = v - z[:, None, :]
        v = v * s[:, None, :]
        return v.reshape(rows * 2, bn)
    v = d.astype(jnp.float32)
    if g is None:
        if z is not None:
            v = v - z
        return v * s
    rows, bn = d.shape
    v = v.reshape(rows // g, g, bn)
    if z is not None:
        v = v - z[:, None, :]
    return (v * s[:, None, :]).reshape(rows, bn)


def _fwd_kernel(*refs, fmt, g, has_z, sym_int4, cdt, nk):
    if has_z:
        x_ref, d_ref, s_ref, z_ref, o_ref, acc_ref = refs
    else:
        x_ref, d_ref, s_ref, o_ref, acc_ref = refs
        z_ref = None
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = _tile(d_ref[...], s_ref[...], None if z_ref is None else z_ref[...], fmt=fmt, g=g, sym_int4=sym_int4)
    acc_ref[...] += lax.dot_general(x_ref[...].astype(cdt), w.astype(cdt), _NN, preferred_element_type=jnp.float32)

    @pl.when(k == nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _bwd_kernel(*refs, fmt, g, has_z, sym_int4, cdt, nn):
    if has_z:
        dy_ref, d_ref, s_ref, z_ref, o_ref, acc_ref = refs
    else:
        dy_ref, d_ref, s_ref, o_ref, acc_ref = refs
        z_ref = None
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = _tile(d_ref[...], s_ref[...], None if z_ref is None else z_ref[...], fmt=fmt, g=g, sym_int4=sym_int4)
    acc_ref[...] += lax.dot_general(dy_ref[...].astype(cdt), w.astype(cdt), _NT, preferred_element_type=jnp.float32)

    @pl.when(n == nn - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _weight_specs(fmt, g, bk, bn, has_z, kmap):
    """BlockSpecs for (data, scales[, zeros]); kmap(a, b, c) -> (k block, n block)."""
    packed = fmt in ("int4", "nf4")
    d_spec = pl.BlockSpec((bk // 2 if packed else bk, bn), kmap)
    if g is None:
        s_spec = pl.BlockSpec((1, bn), lambda *ix: (0, kmap(*ix)[1]))
    else:
        s_spec = pl.BlockSpec((bk // g, bn), kmap)
    return [d_spec, s_spec] + ([s_spec] if has_z else [])


@functools.partial(jax.jit, static_argnames=("fmt", "g", "bm", "bn", "bk", "interpret"))
def weight_only_matmul(x, data, scales, zeros, *, fmt, g, bm, bn, bk, interpret):
    """x [Mp, Kp] @ W -> [Mp, Np] (x.dtype). data/scales/zeros padded to Kp x Np; zeros f32 or None."""
    Mp, Kp = x.shape
    Np = data.shape[1]
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    has_z = zeros is not None
    sym_int4 = fmt == "int4" and not has_z
    nk = Kp // bk
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))]
    in_specs += _weight_specs(fmt, g, bk, bn, has_z, lambda i, j, k: (k, j))
    args = [x, data, scales] + ([zeros] if has_z else [])
    kernel = functools.partial(_fwd_kernel, fmt=fmt, g=g, has_z=has_z, sym_int4=sym_int4, cdt=cdt, nk=nk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x.dtype),
        grid=(Mp // bm, Np // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.MemorySpace.VMEM((bm, bn), jnp.float32)],
        compiler_params=_cparams("parallel", "parallel", "arbitrary"),
        interpret=_params(interpret),
        name=f"quant_{fmt}_matmul_tpu",
    )(*args)


@functools.partial(jax.jit, static_argnames=("fmt", "g", "bm", "bn", "bk", "interpret"))
def weight_only_matmul_t(dy, data, scales, zeros, *, fmt, g, bm, bn, bk, interpret):
    """dy [Mp, Np] @ W^T -> [Mp, Kp] (dy.dtype)."""
    Mp, Np = dy.shape
    Kp = data.shape[0] * (2 if fmt in ("int4", "nf4") else 1)
    cdt = dy.dtype if dy.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    has_z = zeros is not None
    sym_int4 = fmt == "int4" and not has_z
    nn = Np // bn
    in_specs = [pl.BlockSpec((bm, bn), lambda i, k, n: (i, n))]
    in_specs += _weight_specs(fmt, g, bk, bn, has_z, lambda i, k, n: (k, n))
    args = [dy, data, scales] + ([zeros] if has_z else [])
    kernel = functools.partial(_bwd_kernel, fmt=fmt, g=g, has_z=has_z, sym_int4=sym_int4, cdt=cdt, nn=nn)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Kp), dy.dtype),
        grid=(Mp // bm, Kp // bk, nn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, k, n: (i, k)),
        scratch_shapes=[pltpu.MemorySpace.VMEM((bm, bk), jnp.float32)],
        compiler_params=_cparams("parallel", "parallel", "arbitrary"),
        interpret=_params(interpret),
        name=f"quant_{fmt}_matmul_t_tpu",
    )(*args)


def _w8a8_kernel(xq_ref, sx_ref, wq_ref, sw_ref, o_ref, acc_ref, *, nk):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(xq_ref[...], wq_ref[...], _NN, preferred_element_type=jnp.int32)

    @pl.when(k == nk - 1)
    def _():
        o_ref[...] = (acc_ref[...].astype(jnp.float32) * sx_ref[...] * sw_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "out_dtype", "interpret"))
def w8a8_matmul(xq, sx, wq, sw, *, bm, bn, bk, out_dtype, interpret):
    Mp, Kp = xq.shape
    Np = wq.shape[1]
    nk = Kp // bk
    return pl.pallas_call(
        functools.partial(_w8a8_kernel, nk=nk),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, Np // bn, nk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.MemorySpace.VMEM((bm, bn), jnp.int32)],
        compiler_params=_cparams("parallel", "parallel", "arbitrary"),
        interpret=_params(interpret),
        name="w8a8_matmul_tpu",
    )(xq, sx, wq, sw)


# ------------------------------------------------------------------------------------------------
# TPU block choice and the padded entry points used by api.py. Mosaic wants blocks whose last two
# dims are multiples of (8, 128) or the full array dims; a K block holds 8 groups (sublane-aligned scale rows) or all of K.


def _tpu_dim(n: int, cap: int) -> tuple[int, int]:
    """(block, padded size) for a dim of size n: the full dim when n <= cap, else ``cap`` blocks."""
    if n <= cap:
        return n, n
    return cap, round_up(n, cap)


def _tpu_n(N: int) -> tuple[int, int]:
    for b in (256, 128):
        if N % b == 0:
            return b, N
    if N <= 512:
        return N, N
    return 128, round_up(N, 128)


def _tpu_weight_args(qw: QuantizedWeight, bk_unit: int, bn_np):
    K0 = qw.padded_K
    bk, Kp = _tpu_dim(K0, bk_unit)
    bn, Np = bn_np
    g = qw.group_size
    div = 2 if qw.packed else 1
    s_rows = 1 if g is None else Kp // g
    data = pad_to(qw.data, (Kp // div, Np))
    scales = pad_to(absmax_of(qw), (s_rows, Np))
    zeros = None if qw.zeros is None else pad_to(qw.zeros.astype(jnp.float32), (s_rows, Np))
    return data, scales, zeros, bk, Kp


def quantized_matmul(x2, qw: QuantizedWeight, interpret: bool):
    """x2 [M, K] @ dequantize(qw) with TPU blocks chosen here (padding and slicing included)."""
    M = x2.shape[0]
    K, N = qw.shape
    unit = 512 if qw.group_size is None else 8 * qw.group_size
    bn, Np = _tpu_n(N)
    data, scales, zeros, bk, Kp = _tpu_weight_args(qw, unit, (bn, Np))
    bm, Mp = _tpu_dim(M, 256)
    out = weight_only_matmul(pad_to(x2, (Mp, Kp)), data, scales, zeros, fmt=qw.fmt, g=qw.group_size, bm=bm, bn=bn, bk=bk, interpret=interpret)
    return out[:M, :N]


def quantized_matmul_t(dy2, qw: QuantizedWeight, interpret: bool):
    """dy2 [M, N] @ dequantize(qw).T (the gradient wrt x), TPU blocks chosen here."""
    M = dy2.shape[0]
    K, N = qw.shape
    unit = 512 if qw.group_size is None else 8 * qw.group_size
    bn, Np = _tpu_n(N)
    data, scales, zeros, bk, Kp = _tpu_weight_args(qw, unit, (bn, Np))
    bm, Mp = _tpu_dim(M, 256)
    dx = weight_only_matmul_t(pad_to(dy2, (Mp, Np)), data, scales, zeros, fmt=qw.fmt, g=qw.group_size, bm=bm, bn=bn, bk=bk, interpret=interpret)
    return dx[:M, :K]


def int8_matmul(xq, sx, wq, sw, out_dtype, interpret: bool):
    """W8A8 core on TPU: xq int8 [M, K] @ wq int8 [K, N] * sx [M, 1] * sw [1, N], TPU blocks chosen here."""
    M, K = xq.shape
    N = wq.shape[1]
    bm, Mp = _tpu_dim(M, 256)
    bn, Np = _tpu_n(N)
    bk, Kp = _tpu_dim(K, 512)
    out = w8a8_matmul(
        pad_to(xq, (Mp, Kp)),
        pad_to(sx, (Mp, 1)),
        pad_to(wq, (Kp, Np)),
        pad_to(sw, (1, Np)),
        bm=bm,
        bn=bn,
        bk=bk,
        out_dtype=jnp.dtype(out_dtype),
        interpret=interpret,
    )
    return out[:M, :N]
