"""Plain-jnp attention: the correctness oracle for the Pallas kernels.

Materialises the full ``[batch, heads, q_len, kv_len]`` mask and logits, computes in float32
(float64 if the inputs are float64). Same masking semantics as the kernels:

* queries are the LAST ``q_len`` positions of the key sequence: query ``i`` has absolute position
  ``i + kv_len - q_len`` (this only matters for ``causal`` / ``local_window_size``);
* ``local_window_size=(left, right)``: the query at position ``p`` sees keys ``j`` with
  ``p - left <= j <= p + right`` (an int ``w`` means ``(w, w)``, as in
  ``jax.nn.dot_product_attention``); ``causal`` additionally requires ``j <= p``;
* segment ids: a query only sees keys of its own segment;
* rows that see no key return zeros (not NaN), and their gradient is zero.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention import common


def attention_mask(q_len, kv_len, *, causal=False, local_window_size=None, q_segment_ids=None, kv_segment_ids=None):
    """Boolean visibility mask, ``[batch or 1, q_len, kv_len]``."""
    left, right = common.window_bounds(causal, local_window_size)
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), dtype=bool)
    if left is not None:
        mask &= k_pos >= q_pos - left
    if right is not None:
        mask &= k_pos <= q_pos + right
    mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def _masked_softmax_attention(q, k, v, mask, scale):
    """q [B,T,H,D], k/v [B,S,K,D], mask broadcastable to [B,H,T,S]."""
    dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qf = q.astype(dtype).reshape(b, t, kvh, g, d)
    kf = k.astype(dtype)
    vf = v.astype(dtype)
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf) * scale
    mask = mask[:, None, None]  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p, vf)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def attention_reference(q, k, v, *, causal=False, local_window_size=None, q_segment_ids=None, kv_segment_ids=None, scale=None):
    """Reference multi-head attention with the same signature as ``flash_attention``."""
    common.check_attention_args(q, k, v, local_window_size, q_segment_ids, kv_segment_ids)
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if kv_segment_ids is not None and q_segment_ids is None:
        q_segment_ids = kv_segment_ids
    scale = common.default_scale(q, scale)
    mask = attention_mask(
        q.shape[1], k.shape[1], causal=causal, local_window_size=local_window_size, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids
    )
    return _masked_softmax_attention(q, k, v, mask, scale)


def decode_reference(q, k_cache, v_cache, *, kv_len=None, scale=None, local_window_size=None):
    """Reference for ``flash_decode``: per batch, the ``q_len`` queries sit at positions
    ``kv_len[b] - q_len .. kv_len[b] - 1`` and attend causally to ``k_cache[b, :kv_len[b]]``."""
    common.check_decode_args(q, k_cache, v_cache, kv_len)
    b, t = q.shape[:2]
    s = k_cache.shape[1]
    if kv_len is None:
        kv_len = jnp.full((b,), s, jnp.int32)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    left, _ = common.window_bounds(True, local_window_size)
    q_pos = kv_len[:, None, None] - t + jnp.arange(t)[None, :, None]  # [B,T,1]
    k_pos = jnp.arange(s)[None, None, :]
    mask = (k_pos <= q_pos) & (k_pos < kv_len[:, None, None])
    if left is not None:
        mask &= k_pos >= q_pos - left
    return _masked_softmax_attention(q, k_cache, v_cache, mask, common.default_scale(q, scale))
