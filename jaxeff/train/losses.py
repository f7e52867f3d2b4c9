"""Loss functions shared by the methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Mean next-token cross-entropy over real tokens.

    logits ``[batch, seq, vocab]``, targets ``[batch, seq]`` int, mask ``[batch, seq]`` (1 = count).
    Returns ``(mean_loss, n_tokens)``; the mean is 0 when no token counts.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is None:
        mask = jnp.ones_like(nll)
    mask = mask.astype(jnp.float32)
    n = mask.sum()
    return (nll * mask).sum() / jnp.maximum(n, 1.0), n
