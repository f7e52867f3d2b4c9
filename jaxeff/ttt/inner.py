"""The inner loop of TTT-E2E: one SGD step on the fast weights per mini-batch of b tokens.

For each chunk of b tokens (in order): run the suffix blocks with the current fast weights and the
KV buffer of the previous ``window`` tokens, record the per-token next-token losses (these
*pre-update* losses are what training averages and evaluation reports), take the gradient of the
chunk's mean loss w.r.t. the fast weights only, clip it to global norm ``inner_clip`` and step
``w <- w - lr * g``. Every row of the batch is its own sequence with its own fast weights.

Packed rows (several segments, i.e. documents, per row): the fast weights restart at every
segment, so nothing reaches a document's predictions from another document through them (attention
is already masked by segment). A token whose segment started in its own mini-batch (after the row's
first token) is *fresh*: it is predicted with the initial fast weights ``w0``, the other tokens of
the chunk with the current ones (per token, at each fast MLP; attention never mixes the two since it
stays within a segment). The step then continues the chunk's *last* segment: the gradient is that of
the mean loss over the last segment's tokens of the chunk, taken at ``w0`` when that segment is fresh
(which restarts the weights) and at the current weights otherwise. So every document is predicted
exactly as if it were alone in its row at the same offset within its mini-batch (padding before
it). A chunk where no row has a fresh token runs the plain step (a ``lax.cond``): single-document
rows are computed exactly as without segments.

Written as a ``lax.scan`` over chunks whose body is ``jax.checkpoint``-ed; the outer gradient goes
through the whole loop, inner gradients included (second order, no stop-gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.ttt.model import TTTSpec, initial_fast_weights, empty_buffers, prefix_forward, suffix_forward


def token_nll(logits, targets):
    """``logits [batch, c, vocab]``, ``targets [batch, c]`` -> per-token negative log-likelihood."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def row_norm(tree):
    """Global L2 norm per row of a tree of ``[batch, ...]`` arrays -> ``[batch]``; differentiable
    (twice) also where the gradient is exactly zero."""
    sq = sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tree))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def chunk_loss(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, targets, mask):
    """Sum over rows of each row's mean loss on this chunk (so the gradient w.r.t. the per-row fast
    weights is each row's own gradient). Aux: per-token losses ``[batch, c]`` and the grown buffers."""
    logits, grown = suffix_forward(spec, params, w, bufs, x, positions, segment_ids)
    nll = token_nll(logits, targets)
    mask = mask.astype(nll.dtype)
    per_row = (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_row.sum(), (nll, grown, logits)


def _sgd(spec: TTTSpec, w, g, lr):
    """Clip ``g`` to global norm ``inner_clip`` per row, then ``w - lr * g``."""
    if spec.inner_clip is not None:
        norm = row_norm(g)
        scale = jnp.minimum(1.0, spec.inner_clip / jnp.maximum(norm, 1e-30))
        g = jax.tree.map(lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), g)
    return jax.tree.map(lambda a, b: a - jnp.asarray(lr, a.dtype) * b, w, g)


def _per_row(a, like):
    """``[batch]`` -> broadcastable against ``like [batch, ...]``."""
    return a.reshape((-1,) + (1,) * (like.ndim - 1))


def inner_step(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, targets, mask, lr, *, w0=None, fresh=None):
    """One chunk: ``(new fast weights, grown buffers, per-token losses [batch, c], logits)``.

    With ``fresh [batch, c]`` (bool) and the initial weights ``w0``: the fresh tokens are predicted
    with ``w0``, the rest with ``w``; the step continues the chunk's last segment (gradient of its
    mean loss over its tokens, at ``w0`` in a row whose last segment is fresh). See the module doc."""
    if fresh is None:
        (_, (nll, grown, logits)), g = jax.value_and_grad(functools.partial(chunk_loss, spec), argnums=1, has_aux=True)(
            params, w, bufs, x, positions, segment_ids, targets, mask
        )
        return _sgd(spec, w, g, lr), grown, nll, logits

    last = mask * (segment_ids == segment_ids[:, -1:]).astype(mask.dtype)  # the tokens the step continues

    def loss(wa, wb):
        logits, grown = suffix_forward(spec, params, wa, bufs, x, positions, segment_ids, wb, fresh)
        nll = token_nll(logits, targets)
        m = last.astype(nll.dtype)
        return ((nll * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)).sum(), (nll, grown, logits)

    (_, (nll, grown, logits)), (ga, gb) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, w0)
    # a row's last segment is fresh iff the row has a fresh token; only that segment's tokens are in
    # the loss, so one of ga, gb is zero
    restart = fresh.any(-1)
    start = jax.tree.map(lambda a, b: jnp.where(_per_row(restart, a), b, a), w, w0)
    return _sgd(spec, start, jax.tree.map(jnp.add, ga, gb), lr), grown, nll, logits


def fresh_tokens(segment_ids, b):
    """``[batch, t]`` bool: the token's segment started inside the token's own mini-batch of ``b``
    (counted from the row's first token), and not at the row's first token."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    boundary = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)  # index of the token's segment's first token
    return (start > 0) & (start >= (idx // b) * b)


def trim(spec: TTTSpec, grown):
    """Buffer + chunk -> the last ``window`` tokens of each suffix block."""
    return tuple({k: v[:, -spec.window(i) :] for k, v in g.items()} for i, g in zip(spec.suffix_layers, grown))


def to_chunks(a, b):
    """``[batch, n * b, ...]`` -> ``[n, batch, b, ...]``."""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // b, b, *a.shape[2:]), 1, 0)


def from_chunks(a):
    """``[n, batch, b, ...]`` -> ``[batch, n * b, ...]``."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def scan_chunks(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, targets, mask, lr, *, return_logits=False, w0=None):
    """The inner loop over ``x [batch, n * b, d]`` (prefix outputs). Returns the final fast weights,
    the final buffers, per-token losses ``[batch, n * b]`` and, with ``return_logits``, the logits
    ``[batch, n * b, vocab]`` (each chunk predicted with the weights updated through the previous one).
    With ``w0`` (the initial fast weights) the weights restart at every segment (module doc); the
    arrays must then start at the row's first token."""
    b = spec.mini_batch
    arrays = (x, positions, segment_ids, targets, mask)
    if w0 is not None:
        arrays += (fresh_tokens(segment_ids, b),)
    xs = tuple(to_chunks(a, b) for a in arrays)

    def body(carry, inp):
        w, bufs = carry
        if w0 is None:
            w, grown, nll, logits = inner_step(spec, params, w, bufs, *inp, lr)
        else:
            *inp, fresh = inp
            w, grown, nll, logits = jax.lax.cond(
                jnp.any(fresh),
                lambda: inner_step(spec, params, w, bufs, *inp, lr, w0=w0, fresh=fresh),
                lambda: inner_step(spec, params, w, bufs, *inp, lr),
            )
        return (w, trim(spec, grown)), (nll, logits if return_logits else None)

    if spec.remat:
        body = jax.checkpoint(body)
    (w, bufs), (nll, logits) = jax.lax.scan(body, (w, bufs), xs)
    return w, bufs, from_chunks(nll), (from_chunks(logits) if return_logits else None)


def forward(spec: TTTSpec, params, inputs, positions, segment_ids, targets, mask, lr, *, return_logits=False, segments=True):
    """Prefix blocks once, then the inner loop. ``inputs [batch, n * b]``. Returns
    ``(per-token losses [batch, n * b], logits or None, final fast weights, final buffers)``.
    ``segments``: the fast weights restart at every segment (module doc); False (static) for rows
    known to hold one document each (the plain loop, the same numbers on such rows)."""
    x, _ = prefix_forward(spec, params, inputs, positions, segment_ids)
    batch = inputs.shape[0]
    w0 = initial_fast_weights(spec, params, batch)
    w, bufs, nll, logits = scan_chunks(
        spec,
        params,
        w0,
        empty_buffers(spec, batch),
        x,
        positions,
        segment_ids,
        targets,
        mask,
        lr,
        return_logits=return_logits,
        w0=w0 if segments else None,
    )
    return nll, logits, w, bufs


def unrolled_forward(spec: TTTSpec, params, inputs, positions, segment_ids, targets, mask, lr):
    """The same loop as :func:`forward` in a plain Python loop over chunks (a test reference). The
    restart at segments is written differently here: the suffix runs twice per chunk, with the
    current and with the initial fast weights, and each token (its loss, logits and buffer entries)
    is taken from the run its segment calls for."""
    x, _ = prefix_forward(spec, params, inputs, positions, segment_ids)
    batch, b = inputs.shape[0], spec.mini_batch
    w0 = initial_fast_weights(spec, params, batch)
    w, bufs = w0, empty_buffers(spec, batch)
    fresh_all = fresh_tokens(segment_ids, b)
    out = []
    for s in range(0, inputs.shape[1], b):
        sl = slice(s, s + b)
        chunk = (x[:, sl], positions[:, sl], segment_ids[:, sl])
        fresh, m = fresh_all[:, sl], mask[:, sl]
        last = m * (segment_ids[:, sl] == segment_ids[:, s + b - 1 : s + b]).astype(m.dtype)

        def loss(wa, wb):
            (la, ga), (lb, gb) = (suffix_forward(spec, params, v, bufs, *chunk) for v in (wa, wb))
            nll = jnp.where(fresh, token_nll(lb, targets[:, sl]), token_nll(la, targets[:, sl]))
            grown = tuple(
                {
                    k: jnp.where(
                        jnp.concatenate([jnp.zeros_like(ba["seg"][:, :-b], bool), fresh], 1).reshape(fresh.shape[0], -1, *(1,) * (ba[k].ndim - 2)),
                        bb[k],
                        ba[k],
                    )
                    for k in ba
                }
                for ba, bb in zip(ga, gb)
            )
            return ((nll * last).sum(-1) / jnp.maximum(last.sum(-1), 1.0)).sum(), (nll, grown)

        (_, (nll, grown)), (ga, gb) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, w0)
        restart = fresh.any(-1)
        w = _sgd(spec, jax.tree.map(lambda a, c: jnp.where(_per_row(restart, a), c, a), w, w0), jax.tree.map(jnp.add, ga, gb), lr)
        bufs = trim(spec, grown)
        out.append(nll)
    return jnp.concatenate(out, axis=1), w
