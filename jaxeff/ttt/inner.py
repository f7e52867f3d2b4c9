"""The inner loop of TTT-E2E: one SGD step on the fast weights per mini-batch of b tokens.

For each chunk of b tokens (in order): run the suffix blocks with the current fast weights and the
KV buffer of the previous ``window`` tokens, record the per-token next-token losses (these
*pre-update* losses are what training averages and evaluation reports), take the gradient of the
chunk's mean loss w.r.t. the fast weights only, clip it to global norm ``inner_clip`` and step
``w <- w - lr * g``. Every row of the batch is its own sequence with its own fast weights.

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


def inner_step(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, targets, mask, lr):
    """One chunk: ``(new fast weights, grown buffers, per-token losses [batch, c], logits)``."""
    (_, (nll, grown, logits)), g = jax.value_and_grad(
        functools.partial(chunk_loss, spec), argnums=1, has_aux=True)(params, w, bufs, x, positions, segment_ids,
                                                                       targets, mask)
    if spec.inner_clip is not None:
        norm = row_norm(g)
        scale = jnp.minimum(1.0, spec.inner_clip / jnp.maximum(norm, 1e-30))
        g = jax.tree.map(lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), g)
    w = jax.tree.map(lambda a, b: a - jnp.asarray(lr, a.dtype) * b, w, g)
    return w, grown, nll, logits


def trim(spec: TTTSpec, grown):
    """Buffer + chunk -> the last ``window`` tokens of each suffix block."""
    return tuple({k: v[:, -spec.window(i):] for k, v in g.items()} for i, g in zip(spec.suffix_layers, grown))


def to_chunks(a, b):
    """``[batch, n * b, ...]`` -> ``[n, batch, b, ...]``."""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // b, b, *a.shape[2:]), 1, 0)


def from_chunks(a):
    """``[n, batch, b, ...]`` -> ``[batch, n * b, ...]``."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def scan_chunks(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, targets, mask, lr, *,
                return_logits=False):
    """The inner loop over ``x [batch, n * b, d]`` (prefix outputs). Returns the final fast weights,
    the final buffers, per-token losses ``[batch, n * b]`` and, with ``return_logits``, the logits
    ``[batch, n * b, vocab]`` (each chunk predicted with the weights updated through the previous one)."""
    b = spec.mini_batch
    xs = tuple(to_chunks(a, b) for a in (x, positions, segment_ids, targets, mask))

    def body(carry, inp):
        w, bufs = carry
        w, grown, nll, logits = inner_step(spec, params, w, bufs, *inp, lr)
        return (w, trim(spec, grown)), (nll, logits if return_logits else None)

    if spec.remat:
        body = jax.checkpoint(body)
    (w, bufs), (nll, logits) = jax.lax.scan(body, (w, bufs), xs)
    return w, bufs, from_chunks(nll), (from_chunks(logits) if return_logits else None)


def forward(spec: TTTSpec, params, inputs, positions, segment_ids, targets, mask, lr, *, return_logits=False):
    """Prefix blocks once, then the inner loop. ``inputs [batch, n * b]``. Returns
    ``(per-token losses [batch, n * b], logits or None, final fast weights, final buffers)``."""
    x, _ = prefix_forward(spec, params, inputs, positions, segment_ids)
    batch = inputs.shape[0]
    w0 = initial_fast_weights(spec, params, batch)
    w, bufs, nll, logits = scan_chunks(spec, params, w0, empty_buffers(spec, batch), x, positions, segment_ids,
                                       targets, mask, lr, return_logits=return_logits)
    return nll, logits, w, bufs


def unrolled_forward(spec: TTTSpec, params, inputs, positions, segment_ids, targets, mask, lr):
    """The same loop as :func:`forward` in a plain Python loop over chunks (a test reference)."""
    x, _ = prefix_forward(spec, params, inputs, positions, segment_ids)
    batch, b = inputs.shape[0], spec.mini_batch
    w, bufs = initial_fast_weights(spec, params, batch), empty_buffers(spec, batch)
    out = []
    for s in range(0, inputs.shape[1], b):
        sl = slice(s, s + b)
        w, grown, nll, _ = inner_step(spec, params, w, bufs, x[:, sl], positions[:, sl], segment_ids[:, sl],
                                      targets[:, sl], mask[:, sl], lr)
        bufs = trim(spec, grown)
        out.append(nll)
    return jnp.concatenate(out, axis=1), w
