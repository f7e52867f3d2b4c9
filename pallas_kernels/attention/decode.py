"""Flash-decoding: a few query tokens (1..16) against a long KV cache, Pallas on Triton.

The KV cache is split along its length into ``num_splits`` chunks; grid
``(batch * kv_heads, num_splits)``. Each program handles ALL query heads of its KV group and all
query tokens at once (``rows = group * q_len``, padded to >= 16 for the tensor cores), so every K/V
tile is read from HBM exactly once per kernel. It writes a partial, normalised output and a base-2
log-sum-exp per split; a tiny XLA epilogue combines the splits. Per-batch valid lengths
(``kv_len``) bound the loop, so the unused tail of the cache is never read; a sliding window
raises the lower bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import LOG2E
from pallas_kernels.attention.triton_fwd import dot_nn, dot_nt

NEG_INF = float("-inf")


def _decode_kernel(kvlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, q_len, left, block_k, blocks_per_split, kv_heads):
    b = pl.program_id(0) // kv_heads
    split = pl.program_id(1)
    rows, head_dim = q_ref.shape
    kvl = kvlen_ref[b]
    q = q_ref[...]
    t = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % q_len
    q_pos = kvl - q_len + t  # absolute positions of the query rows

    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, lax.div(kvl + (block_k - 1), block_k))
    if left is not None:
        lo = jnp.maximum(lo, lax.div(jnp.maximum(kvl - q_len - left, 0), block_k))
    qk_scale = scale * LOG2E

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = dot_nt(q, k) * qk_scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = k_pos <= q_pos  # causal among the new tokens (and < kv_len)
        if left is not None:
            mask = jnp.logical_and(mask, k_pos >= q_pos - left)
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, carry)
    empty = l == 0.0
    o_ref[...] = acc * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))[:, None]
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log2(jnp.where(empty, 1.0, l)))


def flash_decode_partials(q_rows, k_cache, v_cache, kv_len, *, scale, q_len, left, block_k, num_splits, num_warps, num_stages, interpret):
    """q_rows [B, K, R, D] (R = group * q_len padded to >= 16); caches [B, S, K, D], S % block_k == 0.

    Returns partial outputs [B, K, splits, R, D] fp32 and base-2 lse [B, K, splits, R].
    """
    b, kvh, rows, d = q_rows.shape
    s = k_cache.shape[1]
    n_blocks = s // block_k
    per_split = -(-n_blocks // num_splits)
    kernel = functools.partial(_decode_kernel, scale=scale, q_len=q_len, left=left, block_k=block_k, blocks_per_split=per_split, kv_heads=kvh)
    cache_spec = pl.BlockSpec((None, s, None, d), lambda bk, sp: (bk // kvh, 0, bk % kvh, 0))
    return pl.pallas_call(
        kernel,
        grid=(b * kvh, num_splits),
        in_specs=[
            pl.BlockSpec((b,), lambda bk, sp: (0,)),
            pl.BlockSpec((None, None, rows, d), lambda bk, sp: (bk // kvh, bk % kvh, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda bk, sp: (bk // kvh, bk % kvh, sp, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bk, sp: (bk // kvh, bk % kvh, sp, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, num_splits, rows, d), jnp.float32), jax.ShapeDtypeStruct((b, kvh, num_splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_decode",
    )(kv_len, q_rows, k_cache, v_cache)


def combine_splits(o_part, lse_part):
    """Merges per-split (normalised output, base-2 lse) pairs; all-empty rows give 0."""
    m = jnp.max(lse_part, axis=2, keepdims=True)
    m = jnp.where(m == NEG_INF, 0.0, m)
    w = jnp.exp2(lse_part - m)  # 0 for empty splits
    denom = jnp.sum(w, axis=2)
    o = jnp.sum(o_part * w[..., None], axis=2)
    return o / jnp.where(denom == 0.0, 1.0, denom)[..., None]
