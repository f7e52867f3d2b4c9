"""Prefill and token-by-token decoding of a TTT-E2E model: one inner step per b tokens.

The decoding state (a plain dict, the ``cache`` that :func:`jaxeff.models.generate.generate`
carries through its scan):

* ``index``: tokens seen so far (the next token's position); ``count``: tokens in the pending
  mini-batch (1..b after prefill and after each token);
* ``fast``: the fast weights ``{"layers_i": {"gate", "up": [batch, d, f], "down": [batch, f, d]}}``,
  updated through the last complete mini-batch;
* ``prefix``: per prefix block a ring buffer of the last ``S`` tokens' keys and values, ``S`` the
  block's window (``max_len`` for a full-attention block): ``k, v [batch, S,
  kv_heads, hd]`` and ``pos [S]`` (the position held in each slot, ``-1`` = empty); position ``p``
  lives in slot ``p % S``, so memory per sequence stays flat however long generation runs;
* ``suffix``: per suffix block ``k, v [batch, window + b, kv_heads, hd]`` and ``seg [batch, window + b]``:
  the ``window`` tokens before the pending mini-batch, then its ``b`` slots (``seg == -1`` = empty);
* ``chunk_x``, ``chunk_tok``, ``chunk_pos``: the pending mini-batch's prefix outputs, tokens, positions.

When a token arrives while the pending mini-batch is full, its b targets are known (the tokens
after each, the last being the new token): the inner step runs on it exactly as in training (the
suffix blocks recomputed from ``chunk_x`` with the weights and buffers of its start), the buffers
move on by b tokens, and the new token starts the next mini-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.ttt.inner import inner_step, scan_chunks, trim
from jaxeff.ttt.model import (
    _DTYPES,
    TTTSpec,
    block_rest,
    buffer_attention,
    dense,
    embed,
    empty_buffers,
    head,
    initial_fast_weights,
    prefix_forward,
    qkv,
    rms_norm,
    suffix_forward,
)


def _pad_to(a, n, value=0):
    return jnp.pad(a, ((0, 0), (0, n - a.shape[1])) + ((0, 0),) * (a.ndim - 2), constant_values=value)


def _ring_slots(spec: TTTSpec, i: int, max_len: int) -> int:
    """Slots of prefix block ``i``'s KV ring buffer: its window (``max_len`` with full attention)."""
    w = spec.window(i)
    return max_len if w is None else w


def _ring_from_prompt(k, v, slots):
    """The ring buffer ``{"k", "v": [batch, slots, ...], "pos": [slots]}`` holding the last ``slots`` of
    the prompt's keys/values ``k, v [batch, t, ...]`` (position p in slot p % slots)."""
    t = k.shape[1]
    if t < slots:
        pos = jnp.concatenate([jnp.arange(t, dtype=jnp.int32), jnp.full((slots - t,), -1, jnp.int32)])
        return {"k": _pad_to(k, slots), "v": _pad_to(v, slots), "pos": pos}
    shift = (t - slots) % slots
    return {
        "k": jnp.roll(k[:, t - slots :], shift, axis=1),
        "v": jnp.roll(v[:, t - slots :], shift, axis=1),
        "pos": jnp.roll(jnp.arange(t - slots, t, dtype=jnp.int32), shift),
    }


def prefill(spec: TTTSpec, params, tokens, max_len: int | None = None, lr=None):
    """Run the prompt ``tokens [batch, t]`` (t >= 1): the inner loop over its complete mini-batches
    whose targets are all known (``(t - 1) // b`` of them), the rest as the pending mini-batch.
    Returns ``(logits [batch, t, vocab], state)``; ``max_len`` (default t) sizes the KV caches of
    full-attention prefix blocks only: a windowed block keeps a ring of ``window`` slots."""
    batch, t = tokens.shape
    b = spec.mini_batch
    max_len = max_len or t
    lr = spec.inner_lr if lr is None else lr
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    seg = jnp.ones((batch, t), jnp.int32)
    x, kvs = prefix_forward(spec, params, tokens, positions, seg)
    x = x.astype(_DTYPES[spec.inner_dtype])
    n_up = (t - 1) // b
    w, bufs = initial_fast_weights(spec, params, batch), empty_buffers(spec, batch)
    logits = []
    if n_up:
        s = n_up * b
        w, bufs, _, lg = scan_chunks(
            spec, params, w, bufs, x[:, :s], positions[:, :s], seg[:, :s], tokens[:, 1 : s + 1], jnp.ones((batch, s), jnp.float32), lr, return_logits=True
        )
        logits.append(lg)
    s = n_up * b
    lg, grown = suffix_forward(spec, params, w, bufs, x[:, s:], positions[:, s:], seg[:, s:])
    logits.append(lg)
    free = s + b - t  # empty slots of the pending mini-batch
    state = {
        "index": jnp.asarray(t, jnp.int32),
        "count": jnp.asarray(t - s, jnp.int32),
        "fast": w,
        "prefix": (
            tuple(_ring_from_prompt(k, v, _ring_slots(spec, i, max_len)) for i, (k, v) in zip(spec.prefix_layers, kvs)) if spec.use_attention else ()
        ),
        "suffix": tuple(
            {
                "k": _pad_to(g["k"], g["k"].shape[1] + free),
                "v": _pad_to(g["v"], g["v"].shape[1] + free),
                "seg": _pad_to(g["seg"], g["seg"].shape[1] + free, -1),
            }
            for g in grown
        ),
        "chunk_x": _pad_to(x[:, s:], b),
        "chunk_tok": _pad_to(tokens[:, s:], b),
        "chunk_pos": _pad_to(positions[:, s:], b),
    }
    return jnp.concatenate(logits, axis=1), state


def _advance(spec: TTTSpec, params, state, tok, lr):
    """The pending mini-batch is full and ``tok [batch]`` follows it: one inner step; buffers move on."""
    batch, b = tok.shape[0], spec.mini_batch
    start = tuple({k: v[:, : spec.window(i)] for k, v in buf.items()} for i, buf in zip(spec.suffix_layers, state["suffix"]))
    targets = jnp.concatenate([state["chunk_tok"][:, 1:], tok[:, None]], axis=1)
    seg = jnp.ones((batch, b), jnp.int32)
    w, grown, _, _ = inner_step(
        spec, params, state["fast"], start, state["chunk_x"], state["chunk_pos"], seg, targets, jnp.ones((batch, b), jnp.float32), lr
    )
    suffix = tuple(
        {"k": _pad_to(g["k"], g["k"].shape[1] + b), "v": _pad_to(g["v"], g["v"].shape[1] + b), "seg": _pad_to(g["seg"], g["seg"].shape[1] + b, -1)}
        for g in trim(spec, grown)
    )
    return {**state, "fast": w, "suffix": suffix, "count": jnp.zeros((), jnp.int32)}


def decode_step(spec: TTTSpec, params, state, tok, lr=None):
    """One new token ``tok [batch]``: ``(logits [batch, vocab], state)``."""
    lr = spec.inner_lr if lr is None else lr
    cfg, b = spec.model, spec.mini_batch
    state = jax.lax.cond(state["count"] == b, lambda s: _advance(spec, params, s, tok, lr), lambda s: s, state)
    batch = tok.shape[0]
    index, count = state["index"], state["count"]
    pos = jnp.broadcast_to(index, (batch, 1)).astype(jnp.int32)
    dtype = _DTYPES[spec.compute_dtype]
    x = embed(spec, params, tok[:, None])
    prefix = []
    for j, i in enumerate(spec.prefix_layers):
        p = params["model"][f"layers_{i}"]
        if spec.use_attention:
            q, k, v = qkv(cfg, p["attn"], rms_norm(p["attn_norm"], x, cfg.norm_eps, dtype), pos, dtype)
            c = state["prefix"][j]
            slots = c["pos"].shape[0]
            slot = index % slots
            ck = jax.lax.dynamic_update_slice_in_dim(c["k"], k.astype(c["k"].dtype), slot, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(c["v"], v.astype(c["v"].dtype), slot, axis=1)
            cpos = jax.lax.dynamic_update_slice_in_dim(c["pos"], index[None].astype(jnp.int32), slot, axis=0)
            prefix.append({"k": ck, "v": cv, "pos": cpos})
            # the ring holds only positions index - slots + 1 .. index (those written), all within the
            # window: every written slot is visible (buffer_attention with the query after the last slot)
            seen = jnp.broadcast_to(jnp.where(cpos >= 0, 1, -1), (batch, slots))
            y = buffer_attention(q, ck.astype(dtype), cv.astype(dtype), slots - 1, slots, jnp.ones((batch, 1), jnp.int32), seen)
            x = x + dense(p["attn"]["o"], y.reshape(batch, 1, -1), dtype)
        x = block_rest(spec, p, None, None, x, dtype)
    idt = _DTYPES[spec.inner_dtype]
    x = x.astype(idt)
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), count, axis=1)
    state = {
        **state,
        "prefix": tuple(prefix),
        "chunk_x": put(state["chunk_x"], x),
        "chunk_tok": put(state["chunk_tok"], tok[:, None]),
        "chunk_pos": put(state["chunk_pos"], pos),
    }
    suffix = []
    for j, i in enumerate(spec.suffix_layers):
        p = params["model"][f"layers_{i}"]
        if spec.use_attention:
            buf, big = state["suffix"][j], spec.window(i)
            q, k, v = qkv(cfg, p["attn"], rms_norm(p["attn_norm"], x, cfg.norm_eps, idt), pos, idt)
            slot = big + count
            nb = {
                "k": jax.lax.dynamic_update_slice_in_dim(buf["k"], k.astype(buf["k"].dtype), slot, axis=1),
                "v": jax.lax.dynamic_update_slice_in_dim(buf["v"], v.astype(buf["v"].dtype), slot, axis=1),
                "seg": jax.lax.dynamic_update_slice_in_dim(buf["seg"], jnp.ones((batch, 1), jnp.int32), slot, axis=1),
            }
            suffix.append(nb)
            y = buffer_attention(q, nb["k"], nb["v"], slot, big, jnp.ones((batch, 1), jnp.int32), nb["seg"])
            x = x + dense(p["attn"]["o"], y.reshape(batch, 1, -1), idt)
        key = f"layers_{i}"
        x = block_rest(spec, p, params["fast"].get(key), state["fast"].get(key), x, idt)
    logits = head(spec, params, x, idt)[:, 0]
    state = {**state, "suffix": tuple(suffix), "index": index + 1, "count": count + 1}
    return logits, state


def extend(spec: TTTSpec, params, tokens, cache):
    """``Method.apply`` with a cache: a plain model cache (from ``init_cache``) starts a TTT state with
    a prefill of ``tokens``; a TTT state is extended token by token. Returns ``(logits, state)``."""
    if "fast" not in cache:
        max_len = cache["layers"][0]["k"].shape[1] if cache.get("layers") else tokens.shape[1]
        return prefill(spec, params, tokens, max_len)

    def body(state, tok):
        logits, state = decode_step(spec, params, state, tok)
        return state, logits

    state, logits = jax.lax.scan(body, cache, tokens.T)
    return jnp.moveaxis(logits, 0, 1), state
