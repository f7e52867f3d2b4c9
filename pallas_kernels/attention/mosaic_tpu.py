"""FlashAttention forward/backward as Pallas Mosaic (TPU) kernels.

Checked on CPU with ``interpret=pltpu.InterpretParams()`` (backend "tpu_interpret") and by
lowering to Mosaic with ``jax.export(platforms=["tpu"])``; NOT yet run on TPU hardware.

TPU-style structure (vs the Triton kernels, which loop over KV inside one program):
  * layout ``[batch, heads, len, head_dim]`` (the wrapper transposes), KV is the innermost
    "arbitrary" grid axis, m / l / acc live in VMEM scratch across it;
  * per-block visibility tables (``lo, full_lo, full_hi, hi`` from causal / window bounds and
    segment min/max) are scalar-prefetched into SMEM: blocks outside ``[lo, hi)`` are skipped
    with ``pl.when`` AND their index_map is clamped into the range, so no DMA is issued for them
    either; blocks inside ``[full_lo, full_hi)`` skip the mask;
  * backward: dQ kernel (grid B, H, q_blocks, kv_blocks) and dK/dV kernel (grid B, kv_heads,
    kv_blocks, group * q_blocks): GQA sums over the group's query heads inside the reduction axis.
  * natural-log softmax statistics (``exp``); lse saved as ``[B, H, T, 1]`` fp32, +inf for empty
    rows;
  * flash-decoding: grid (B, kv_heads, splits, blocks per split), per-batch ``kv_len`` is
    scalar-prefetched and bounds both the compute (``pl.when``) and the DMAs (clamped index_map).
On real TPUs use block sizes that are multiples of 128 (the lane width); tests use smaller ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.common import BlockSizes, segment_block_ranges
from pallas_kernels.attention.triton_fwd import AttnStatic, block_range, dot_nn, dot_nt, visibility_mask

NEG_INF = float("-inf")
# Mosaic TPU tiles: 128 fills the MXU on every TPU generation (the Triton table does not apply).
TPU_DEFAULT_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128, block_q_dq=128, block_k_dq=128)


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    tp: int
    sp: int


def _interpret_arg(interpret):
    return pltpu.InterpretParams() if interpret else False


def _cparams(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


# ------------------------------------------------------------------------------------------------
# visibility tables
# ------------------------------------------------------------------------------------------------


def visibility_table(st: AttnStatic, batch, n_own, own_block, n_other, other_block, *, transposed, own_seg=None, other_seg=None):
    """int32 [4, batch, n_own]: (lo, full_lo, full_hi, hi) block ranges of the other axis.

    transposed=False: own = query blocks, other = KV blocks; True: own = KV, other = query blocks.
    """
    idx = jnp.arange(n_own, dtype=jnp.int32)
    first = idx * own_block
    last = first + own_block - 1
    if not transposed:
        rng = jax.vmap(
            lambda f, l: block_range(
                f + st.offset, l + st.offset, reach_lo=st.left, reach_hi=st.right, block=other_block, n_blocks=n_other, n_full=st.kv_len // other_block
            )
        )(first, last)
    else:
        rng = jax.vmap(
            lambda f, l: block_range(
                f - st.offset, l - st.offset, reach_lo=st.right, reach_hi=st.left, block=other_block, n_blocks=n_other, n_full=n_other
            )
        )(first, last)
    lo, flo, fhi, hi = (jnp.broadcast_to(r[None], (batch, n_own)) for r in rng)
    if own_seg is not None:
        slo, shi = segment_block_ranges(own_seg, other_seg, own_block, other_block)
        lo = jnp.maximum(lo, slo)
        hi = jnp.maximum(jnp.minimum(hi, shi), lo)
        flo = fhi = jnp.zeros_like(lo)  # segment masks can cut any block
    return jnp.stack([lo, flo, fhi, hi]).astype(jnp.int32)


def _clamped(x, rng_ref, c_b, c_i, n_blocks):
    lo = rng_ref[0, c_b, c_i]
    hi = rng_ref[3, c_b, c_i]
    return jnp.minimum(jnp.clip(x, lo, jnp.maximum(hi - 1, lo)), n_blocks - 1)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(rng_ref, q_ref, k_ref, v_ref, *rest, st: AttnStatic, bq, bk, nk):
    if st.has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, flo, fhi, hi = (rng_ref[c, b, i] for c in range(4))

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        s = dot_nt(q_ref[...], k_ref[...]) * st.scale
        if masked:
            q_pos = i * bq + st.offset + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            segs = (qseg_ref[...], kseg_ref[...]) if st.has_segments else (None, None)
            s = jnp.where(visibility_mask(q_pos, k_pos, st, *segs), s, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + dot_nn(p.astype(v.dtype), v)
        m_sc[...] = m_new

    in_range = jnp.logical_and(j >= lo, j < hi)
    full = jnp.logical_and(j >= flo, j < fhi)
    pl.when(jnp.logical_and(in_range, full))(lambda: step(False))
    pl.when(jnp.logical_and(in_range, jnp.logical_not(full)))(lambda: step(True))

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _fwd(q, k, v, qseg_col, kseg_row, st, plan: TpuPlan):
    """q [B,H,Tp,D], k/v [B,K,Sp,D] -> out [B,H,Tp,D], lse [B,H,Tp,1]."""
    b, h, tp, d = q.shape
    bq, bk = plan.bq, plan.bk
    nq, nk = tp // bq, plan.sp // bk
    g = st.group
    table = visibility_table(
        st,
        b,
        nq,
        bq,
        nk,
        bk,
        transposed=False,
        own_seg=None if qseg_col is None else qseg_col[..., 0],
        other_seg=None if kseg_row is None else kseg_row[:, 0],
    )
    kv_map = lambda bi, hi, i, j, r: (bi, lax.div(hi, jnp.int32(g)), _clamped(j, r, bi, i, nk), 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, r: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    args = [q, k, v]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, r: (bi, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, r: (bi, 0, _clamped(j, r, bi, i, nk))),
        ]
        args += [qseg_col, kseg_row]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, r: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, r: (bi, hi, i, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk, nk=nk),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32)],
        compiler_params=_cparams("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret_arg(st.interpret),
        name="flash_attention_fwd_tpu",
    )(table, *args)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, st, bq, bk, nk):
    if st.has_segments:
        qseg_ref, kseg_ref, dq_ref, acc_sc = rest
    else:
        dq_ref, acc_sc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, flo, fhi, hi = (rng_ref[c, b, i] for c in range(4))

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        do = do_ref[...]
        s = dot_nt(q_ref[...], k) * st.scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            q_pos = i * bq + st.offset + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            segs = (qseg_ref[...], kseg_ref[...]) if st.has_segments else (None, None)
            p = jnp.where(visibility_mask(q_pos, k_pos, st, *segs), p, 0.0)
        ds = p * (dot_nt(do, v_ref[...]) - delta_ref[...])
        acc_sc[...] += dot_nn(ds.astype(k.dtype), k)

    in_range = jnp.logical_and(j >= lo, j < hi)
    full = jnp.logical_and(j >= flo, j < fhi)
    pl.when(jnp.logical_and(in_range, full))(lambda: step(False))
    pl.when(jnp.logical_and(in_range, jnp.logical_not(full)))(lambda: step(True))

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, st, bq, bk, nq):
    if st.has_segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = lax.rem(r, jnp.int32(nq))
    lo, flo, fhi, hi = (rng_ref[c, b, j] for c in range(4))

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q = q_ref[...]
        do = do_ref[...]
        s_t = dot_nt(k_ref[...], q) * st.scale  # [bk, bq]
        p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, bq]
        if masked:
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
            q_pos = i * bq + st.offset + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
            segs = (qseg_ref[...], kseg_ref[...]) if st.has_segments else (None, None)
            p_t = jnp.where(visibility_mask(q_pos, k_pos, st, *segs, check_kv_pad=False), p_t, 0.0)
        dv_sc[...] += dot_nn(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot_nt(v_ref[...], do) - delta_ref[...])
        dk_sc[...] += dot_nn(ds_t.astype(q.dtype), q)

    in_range = jnp.logical_and(i >= lo, i < hi)
    full = jnp.logical_and(i >= flo, i < fhi)
    pl.when(jnp.logical_and(in_range, full))(lambda: step(False))
    pl.when(jnp.logical_and(in_range, jnp.logical_not(full)))(lambda: step(True))

    @pl.when(r == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd(q, k, v, out, lse, do, qseg_col, kseg_row, st, plan: TpuPlan):
    b, h, tp, d = q.shape
    kvh, sp = k.shape[1], k.shape[2]
    g = st.group
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    qseg = None if qseg_col is None else qseg_col[..., 0]
    kseg = None if kseg_row is None else kseg_row[:, 0]
    interpret = _interpret_arg(st.interpret)

    # dQ: grid (B, H, q blocks, kv blocks)
    bq, bk = plan.bq_dq, plan.bk_dq
    nq, nk = tp // bq, sp // bk
    table = visibility_table(st, b, nq, bq, nk, bk, transposed=False, own_seg=qseg, other_seg=kseg)
    kv_map = lambda bi, hi, i, j, r: (bi, lax.div(hi, jnp.int32(g)), _clamped(j, r, bi, i, nk), 0)
    q_map = lambda bi, hi, i, j, r: (bi, hi, i, 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, r: (bi, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, r: (bi, 0, _clamped(j, r, bi, i, nk))),
        ]
        args += [qseg_col, kseg_row]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, bq=bq, bk=bk, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, nq, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_cparams("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="flash_attention_bwd_dq_tpu",
    )(table, *args)

    # dK/dV: grid (B, kv heads, kv blocks, group * q blocks)
    bq, bk = plan.bq_dkv, plan.bk_dkv
    nq, nk = tp // bq, sp // bk
    table = visibility_table(st, b, nk, bk, nq, bq, transposed=True, own_seg=kseg, other_seg=qseg)
    lse_row = jnp.swapaxes(lse, 2, 3)  # [B, H, 1, Tp]
    delta_row = jnp.swapaxes(delta, 2, 3)

    # Non-negative ints: lax.div / lax.rem (jnp's // and % add sign fix-ups Mosaic can't lower
    # without a TPU target).
    div = lambda x: lax.div(x, jnp.int32(nq))
    rem = lambda x: lax.rem(x, jnp.int32(nq))

    def q_map(bi, ki, j, rr, r):
        return (bi, ki * g + div(rr), _clamped(rem(rr), r, bi, j, nq), 0)

    def row_map(bi, ki, j, rr, r):
        return (bi, ki * g + div(rr), 0, _clamped(rem(rr), r, bi, j, nq))

    kv_map = lambda bi, ki, j, rr, r: (bi, ki, j, 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    args = [q, k, v, do, lse_row, delta_row]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, 1, bq), lambda bi, ki, j, rr, r: (bi, 0, _clamped(rem(rr), r, bi, j, nq))),
            pl.BlockSpec((None, bk, 1), lambda bi, ki, j, rr, r: (bi, j, 0)),
        ]
        args += [jnp.swapaxes(qseg_col, 1, 2), jnp.swapaxes(kseg_row, 1, 2)]
    kv_out = pl.BlockSpec((None, None, bk, d), kv_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, bq=bq, bk=bk, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kvh, nk, g * nq),
            in_specs=in_specs,
            out_specs=[kv_out, kv_out],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_cparams("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="flash_attention_bwd_dkdv_tpu",
    )(table, *args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def flash_tpu_core(q, k, v, qseg_col, kseg_row, st, plan):
    """Transposed, padded inputs: q [B,H,Tp,D], k/v [B,K,Sp,D], segs [B,Tp,1] / [B,1,Sp]."""
    return _fwd(q, k, v, qseg_col, kseg_row, st, plan)[0]


def _core_fwd(q, k, v, qseg_col, kseg_row, st, plan):
    out, lse = _fwd(q, k, v, qseg_col, kseg_row, st, plan)
    return out, (q, k, v, qseg_col, kseg_row, out, lse)


def _core_bwd(st, plan, res, do):
    q, k, v, qseg_col, kseg_row, out, lse = res
    dq, dk, dv = _bwd(q, k, v, out, lse, do, qseg_col, kseg_row, st, plan)
    return dq, dk, dv, None, None


flash_tpu_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# decode (flash-decoding) on TPU
# ------------------------------------------------------------------------------------------------


def _decode_block_bounds(kvl, q_len, left, block_k, split, per_split):
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, lax.div(kvl + (block_k - 1), jnp.int32(block_k)))
    if left is not None:
        lo = jnp.maximum(lo, lax.div(jnp.maximum(kvl - q_len - left, 0), jnp.int32(block_k)))
    return lo, jnp.maximum(hi, lo)


def _decode_kernel(kvlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, q_len, left, block_k, per_split):
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows = q_ref.shape[0]
    kvl = kvlen_ref[b]
    lo, hi = _decode_block_bounds(kvl, q_len, left, block_k, split, per_split)
    blk = split * per_split + j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(jnp.logical_and(blk >= lo, blk < hi))
    def _step():
        s = dot_nt(q_ref[...], k_ref[...]) * scale
        t = lax.rem(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), jnp.int32(q_len))
        q_pos = kvl - q_len + t
        k_pos = blk * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = k_pos <= q_pos
        if left is not None:
            mask = jnp.logical_and(mask, k_pos >= q_pos - left)
        s = jnp.where(mask, s, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + dot_nn(p.astype(v.dtype), v)
        m_sc[...] = m_new

    @pl.when(j == per_split - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        o_ref[...] = acc_sc[...] * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
        # base-2 lse, like the Triton decode kernel, so decode.combine_splits serves both
        lse_ref[...] = jnp.where(empty, NEG_INF, (m_sc[...] + jnp.log(jnp.where(empty, 1.0, l))) * 1.4426950408889634)


def flash_decode_partials_tpu(q_rows, k_cache, v_cache, kv_len, *, scale, q_len, left, block_k, num_splits, interpret):
    """Same contract as decode.flash_decode_partials, as a Mosaic TPU kernel.

    q_rows [B, K, R, D]; caches are transposed to [B, K, S, D] by the caller. Blocks past kv_len /
    before the window are skipped and their DMA avoided by clamping the index_map.
    """
    b, kvh, rows, d = q_rows.shape
    s = k_cache.shape[2]
    n_blocks = s // block_k
    per_split = -(-n_blocks // num_splits)

    def kv_map(bi, ki, sp, j, kvl_ref):
        lo, hi = _decode_block_bounds(kvl_ref[bi], q_len, left, block_k, sp, per_split)
        blk = jnp.clip(sp * per_split + j, lo, jnp.maximum(hi - 1, lo))
        return (bi, ki, jnp.minimum(blk, n_blocks - 1), 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, num_splits, per_split),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda bi, ki, sp, j, r: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, block_k, d), kv_map),
            pl.BlockSpec((None, None, block_k, d), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda bi, ki, sp, j, r: (bi, ki, sp, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda bi, ki, sp, j, r: (bi, ki, sp, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, d), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, q_len=q_len, left=left, block_k=block_k, per_split=per_split),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kvh, num_splits, rows, d), jnp.float32), jax.ShapeDtypeStruct((b, kvh, num_splits, rows, 1), jnp.float32)],
        compiler_params=_cparams("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret_arg(interpret),
        name="flash_decode_tpu",
    )(kv_len, q_rows, k_cache, v_cache)
    return o, lse[..., 0]
