"""FlashAttention-2 forward kernel, Pallas on Triton (GPU); runs on CPU with ``interpret=True``.

Layout: inputs stay ``[batch, len, heads, head_dim]`` (no transposes); the grid is
``(batch * heads, q_blocks)``; each program keeps one ``[block_q, head_dim]`` query tile and an
fp32 accumulator and loops over KV blocks with ``lax.fori_loop`` whose bounds come from the block
indices (causal / sliding-window blocks that are fully hidden are never visited, so a sliding
window costs O(len * window)). For packed segments the wrapper precomputes, per query block, the
range of KV blocks whose [min, max] segment ids overlap the query block's and the loop is
restricted to it. GQA: query head ``h`` reads KV head ``h // (heads // kv_heads)`` in the
BlockSpec index_map, K/V are never repeated.

The loop is split into masked / unmasked / masked ranges: only the blocks that straddle a
window / causal edge or the KV padding build and apply a mask. Scores are computed in base 2
(``scale * log2(e)`` folded into one multiply); the saved log-sum-exp is in base 2 too and is
``+inf`` for rows that see no key (output 0, gradient 0, never NaN).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import LOG2E

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class AttnStatic:
    """Everything static about one (padded) attention call."""

    scale: float
    left: int | None  # query at position p sees keys p-left .. p+right (None: unbounded)
    right: int | None
    q_len: int  # true lengths (before padding)
    kv_len: int
    heads: int
    kv_heads: int
    has_segments: bool
    interpret: bool

    @property
    def offset(self) -> int:  # absolute position of query 0
        return self.kv_len - self.q_len

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _cdiv(x, n: int):
    return lax.div(x + (n - 1), jnp.int32(n))


def block_range(first, last, *, reach_lo, reach_hi, block, n_blocks, n_full):
    """Blocks of the *other* axis visible from own positions [first, last] (other-axis coordinates).

    Own position p sees other indices x with ``p - reach_lo <= x <= p + reach_hi`` (None:
    unbounded). Returns traced int32 ``(lo, full_lo, full_hi, hi)``: blocks ``[lo, hi)`` may hold
    visible entries, blocks ``[full_lo, full_hi)`` are fully visible to every own position and
    contain no padding (``n_full`` = number of padding-free blocks), so they need no mask.
    """
    zero = jnp.int32(0)
    first = jnp.asarray(first, jnp.int32)
    last = jnp.asarray(last, jnp.int32)
    if reach_lo is None:
        lo = zero
        full_lo = zero
    else:
        lo = lax.div(jnp.maximum(first - reach_lo, zero), jnp.int32(block))
        full_lo = _cdiv(jnp.maximum(last - reach_lo, zero), block)
    if reach_hi is None:
        hi = jnp.int32(n_blocks)
        full_hi = jnp.int32(n_full)
    else:
        hi = jnp.minimum(_cdiv(jnp.maximum(last + reach_hi + 1, zero), block), n_blocks)
        full_hi = jnp.minimum(lax.div(jnp.maximum(first + reach_hi + 1, zero), jnp.int32(block)), n_full)
    hi = jnp.maximum(hi, lo)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def visibility_mask(q_pos, k_pos, st: AttnStatic, q_seg=None, k_seg=None, check_kv_pad=True):
    """Boolean mask from absolute query positions (column or row vector) and key indices."""
    mask = None

    def _and(m, c):
        return c if m is None else jnp.logical_and(m, c)

    if st.left is not None:
        mask = _and(mask, k_pos >= q_pos - st.left)
    if st.right is not None:
        mask = _and(mask, k_pos <= q_pos + st.right)
    if check_kv_pad:
        mask = _and(mask, k_pos < st.kv_len)
    if q_seg is not None:
        mask = _and(mask, q_seg == k_seg)
    if mask is None:
        mask = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=jnp.bool_)
    return mask


def run_split_loop(body, lo, full_lo, full_hi, hi, carry, *, needs_mask: bool, segmented: bool):
    """Runs ``body(j, carry, masked)`` over [lo, hi), masking only where needed."""
    if segmented:  # segment masks can cut any block: mask everywhere
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    if not needs_mask:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def q_block_plan(qi, qseg_ref, slo_ref, shi_ref, *, st: AttnStatic, block_q: int, block_k: int, n_kv_blocks: int):
    """For query block ``qi``: absolute query positions ``[block_q, 1]``, query segment ids (or
    None), the KV-block loop bounds ``(lo, full_lo, full_hi, hi)`` narrowed by the per-block
    segment ranges, and whether edge blocks need a mask. Shared by the forward and dQ kernels."""
    q_first = qi * block_q + st.offset  # absolute position of the first query row
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_seg = qseg_ref[...][:, None] if st.has_segments else None
    lo, full_lo, full_hi, hi = block_range(
        q_first, q_first + block_q - 1, reach_lo=st.left, reach_hi=st.right, block=block_k, n_blocks=n_kv_blocks, n_full=st.kv_len // block_k
    )
    if st.has_segments:
        lo = jnp.maximum(lo, slo_ref[qi])
        hi = jnp.maximum(jnp.minimum(hi, shi_ref[qi]), lo)
    needs_mask = st.left is not None or st.right is not None or st.kv_len % block_k != 0
    return q_pos, q_seg, (lo, full_lo, full_hi, hi), needs_mask


def _fwd_kernel(*refs, st: AttnStatic, block_q: int, block_k: int, n_kv_blocks: int):
    if st.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, slo_ref, shi_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kseg_ref = slo_ref = shi_ref = None
    qi = pl.program_id(1)
    head_dim = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E

    q = q_ref[...]  # [block_q, D]
    q_pos, q_seg, (lo, full_lo, full_hi, hi), needs_mask = q_block_plan(
        qi, qseg_ref, slo_ref, shi_ref, st=st, block_q=block_q, block_k=block_k, n_kv_blocks=n_kv_blocks
    )

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = dot_nt(q, k) * qk_scale  # [block_q, block_k], base-2 logits
        if masked:
            k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            k_seg = kseg_ref[pl.ds(start, block_k)][None, :] if st.has_segments else None
            s = jnp.where(visibility_mask(q_pos, k_pos, st, q_seg, k_seg), s, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        if masked:  # a row may still be all -inf: subtract 0 instead of -inf (no NaN)
            m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, l = run_split_loop(body, lo, full_lo, full_hi, hi, carry, needs_mask=needs_mask, segmented=st.has_segments)
    empty = l == 0.0
    inv_l = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc * inv_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def flash_fwd(q, k, v, q_seg, kv_seg, seg_lo, seg_hi, *, st: AttnStatic, block_q: int, block_k: int, num_warps: int, num_stages: int):
    """Padded inputs: q [B, Tp, H, D], k/v [B, Sp, K, D] with Tp % block_q == Sp % block_k == 0.

    Returns (out [B, Tp, H, D] in q.dtype, lse [B, H, Tp] fp32 base-2).
    """
    b, tp, h, d = q.shape
    sp = k.shape[1]
    g = st.group
    nq = tp // block_q
    nk = sp // block_k
    kernel = functools.partial(_fwd_kernel, st=st, block_q=block_q, block_k=block_k, n_kv_blocks=nk)
    in_specs = [
        pl.BlockSpec((None, block_q, None, d), lambda bh, i: (bh // h, i, bh % h, 0)),
        pl.BlockSpec((None, sp, None, d), lambda bh, i: (bh // h, 0, (bh % h) // g, 0)),
        pl.BlockSpec((None, sp, None, d), lambda bh, i: (bh // h, 0, (bh % h) // g, 0)),
    ]
    args = [q, k, v]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda bh, i: (bh // h, i)),
            pl.BlockSpec((None, sp), lambda bh, i: (bh // h, 0)),
            pl.BlockSpec((None, nq), lambda bh, i: (bh // h, 0)),
            pl.BlockSpec((None, nq), lambda bh, i: (bh // h, 0)),
        ]
        args += [q_seg, kv_seg, seg_lo, seg_hi]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, block_q, None, d), lambda bh, i: (bh // h, i, bh % h, 0)),
        pl.BlockSpec((None, None, block_q), lambda bh, i: (bh // h, bh % h, i)),
    ]
    return pl.pallas_call(
        kernel,
        grid=(b * h, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(*args)
