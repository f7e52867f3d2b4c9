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
