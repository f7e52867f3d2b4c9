"""FlashAttention-2 backward kernels, Pallas on Triton (GPU); CPU via ``interpret=True``.

Two kernels recompute the probabilities from the saved base-2 log-sum-exp (no ``[q_len, kv_len]``
matrix is ever stored):

* dK/dV: grid ``(batch * kv_heads, kv_blocks)``. A program owns one K/V tile and loops over the
  ``heads // kv_heads`` query heads of its group and, for each, over the query blocks that can see
  the tile (bounds from causal / window / segment ranges). GQA/MQA dK/dV are therefore summed over
  the group inside the kernel, in fp32, with no per-query-head buffer and no atomics.
  Works in the transposed orientation (``S^T = K Q^T``) so no tile transposes are needed.
* dQ: grid ``(batch * heads, q_blocks)``, loops over KV blocks like the forward kernel.

``delta = rowsum(dO * O)`` is a cheap elementwise reduction left to XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import LOG2E
from pallas_kernels.attention.triton_fwd import AttnStatic, block_range, dot_nn, dot_nt, q_block_plan, run_split_loop, visibility_mask

NEG_INF = float("-inf")


def _dkdv_kernel(*refs, st: AttnStatic, block_q: int, block_k: int, n_q_blocks: int):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, slo_ref, shi_ref, dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    kvh = pl.program_id(0) % st.kv_heads
    kj = pl.program_id(1)
    head_dim = k_ref.shape[-1]
    qk_scale = st.scale * LOG2E

    k = k_ref[...]  # [block_k, D]
    v = v_ref[...]
    k_first = kj * block_k
    k_pos = k_first + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)  # column: keys are rows
    k_seg = kseg_ref[...][:, None] if st.has_segments else None

    # Query index i (absolute position i + offset) sees key x iff x - right <= i + offset <= x + left.
    lo, full_lo, full_hi, hi = block_range(
        k_first - st.offset, k_first + block_k - 1 - st.offset, reach_lo=st.right, reach_hi=st.left, block=block_q, n_blocks=n_q_blocks, n_full=n_q_blocks
    )
    if st.has_segments:
        lo = jnp.maximum(lo, slo_ref[kj])
        hi = jnp.maximum(jnp.minimum(hi, shi_ref[kj]), lo)
    # KV padding rows only produce dK/dV rows that are sliced off; padded query rows have dO = 0.
    needs_mask = st.left is not None or st.right is not None

    def head_body(gi, carry):
        h = kvh * st.group + gi

        def body(i, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(i * block_q, block_q)
            q = q_ref[pl.ds(start, block_q), h, :]  # [block_q, D]
            do = do_ref[pl.ds(start, block_q), h, :]
            lse = lse_ref[h, pl.ds(start, block_q)]  # [block_q]
            delta = delta_ref[h, pl.ds(start, block_q)]
            s_t = dot_nt(k, q) * qk_scale  # [block_k, block_q]
            p_t = jnp.exp2(s_t - lse[None, :])
            if masked:
                q_pos = start + st.offset + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
                q_seg = qseg_ref[pl.ds(start, block_q)][None, :] if st.has_segments else None
                p_t = jnp.where(visibility_mask(q_pos, k_pos, st, q_seg, k_seg, check_kv_pad=False), p_t, 0.0)
            dv = dv + dot_nn(p_t.astype(do.dtype), do)
            dp_t = dot_nt(v, do)  # [block_k, block_q]
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dk + dot_nn(ds_t.astype(q.dtype), q)
            return dk, dv

        return run_split_loop(body, lo, full_lo, full_hi, hi, carry, needs_mask=needs_mask, segmented=st.has_segments)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, st.group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: AttnStatic, block_q: int, block_k: int, n_kv_blocks: int):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, slo_ref, shi_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = slo_ref = shi_ref = None
    qi = pl.program_id(1)
    head_dim = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E

    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_pos, q_seg, (lo, full_lo, full_hi, hi), needs_mask = q_block_plan(
        qi, qseg_ref, slo_ref, shi_ref, st=st, block_q=block_q, block_k=block_k, n_kv_blocks=n_kv_blocks
    )

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = dot_nt(q, k) * qk_scale
        p = jnp.exp2(s - lse)
        if masked:
            k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            k_seg = kseg_ref[pl.ds(start, block_k)][None, :] if st.has_segments else None
            p = jnp.where(visibility_mask(q_pos, k_pos, st, q_seg, k_seg), p, 0.0)
        dp = dot_nt(do, v)
        ds = p * (dp - delta)
        return dq + dot_nn(ds.astype(k.dtype), k)

    dq = run_split_loop(body, lo, full_lo, full_hi, hi, jnp.zeros((block_q, head_dim), jnp.float32), needs_mask=needs_mask, segmented=st.has_segments)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def flash_bwd(
    q,
    k,
    v,
    out,
    lse,
    do,
    q_seg,
    kv_seg,
    ranges_dq,
    ranges_dkv,
    *,
    st: AttnStatic,
    block_q_dkv: int,
    block_k_dkv: int,
    block_q_dq: int,
    block_k_dq: int,
    num_warps_dkv: int,
    num_stages_dkv: int,
    num_warps_dq: int,
    num_stages_dq: int,
):
    """Padded inputs (see flash_fwd). ``ranges_*``: (lo, hi) per-block segment ranges or None.

    Returns dq, dk, dv (padded, in the input dtypes).
    """
    b, tp, h, d = q.shape
    sp, kvh = k.shape[1], k.shape[2]
    g = st.group
    # [B, H, Tp] fp32, like lse.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))

    # ---- dK / dV ----
    nq = tp // block_q_dkv
    nk = sp // block_k_dkv
    in_specs = [
        pl.BlockSpec((None, tp, h, d), lambda bk, j: (bk // kvh, 0, 0, 0)),  # q
        pl.BlockSpec((None, block_k_dkv, None, d), lambda bk, j: (bk // kvh, j, bk % kvh, 0)),
        pl.BlockSpec((None, block_k_dkv, None, d), lambda bk, j: (bk // kvh, j, bk % kvh, 0)),
        pl.BlockSpec((None, tp, h, d), lambda bk, j: (bk // kvh, 0, 0, 0)),  # do
        pl.BlockSpec((None, h, tp), lambda bk, j: (bk // kvh, 0, 0)),  # lse
        pl.BlockSpec((None, h, tp), lambda bk, j: (bk // kvh, 0, 0)),  # delta
    ]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, tp), lambda bk, j: (bk // kvh, 0)),
            pl.BlockSpec((None, block_k_dkv), lambda bk, j: (bk // kvh, j)),
            pl.BlockSpec((None, nk), lambda bk, j: (bk // kvh, 0)),
            pl.BlockSpec((None, nk), lambda bk, j: (bk // kvh, 0)),
        ]
        args += [q_seg, kv_seg, *ranges_dkv]
    kv_spec = pl.BlockSpec((None, block_k_dkv, None, d), lambda bk, j: (bk // kvh, j, bk % kvh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, block_q=block_q_dkv, block_k=block_k_dkv, n_q_blocks=nq),
        grid=(b * kvh, nk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps_dkv, num_stages=num_stages_dkv),
        interpret=st.interpret,
        name="flash_attention_bwd_dkdv",
    )(*args)

    # ---- dQ ----
    nq = tp // block_q_dq
    nk = sp // block_k_dq
    q_spec = pl.BlockSpec((None, block_q_dq, None, d), lambda bh, i: (bh // h, i, bh % h, 0))
    kv_full = pl.BlockSpec((None, sp, None, d), lambda bh, i: (bh // h, 0, (bh % h) // g, 0))
    row_spec = pl.BlockSpec((None, None, block_q_dq), lambda bh, i: (bh // h, bh % h, i))
    in_specs = [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q_dq), lambda bh, i: (bh // h, i)),
            pl.BlockSpec((None, sp), lambda bh, i: (bh // h, 0)),
            pl.BlockSpec((None, nq), lambda bh, i: (bh // h, 0)),
            pl.BlockSpec((None, nq), lambda bh, i: (bh // h, 0)),
        ]
        args += [q_seg, kv_seg, *ranges_dq]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_q=block_q_dq, block_k=block_k_dq, n_kv_blocks=nk),
        grid=(b * h, nq),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps_dq, num_stages=num_stages_dq),
        interpret=st.interpret,
        name="flash_attention_bwd_dq",
    )(*args)
    return dq, dk, dv
