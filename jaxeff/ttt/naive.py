"""TTT-naive: dynamic evaluation of an ordinarily trained model (the baseline of TTT-E2E).

A sequence is read chunk by chunk (``chunk`` = b tokens). For each chunk the model predicts the
chunk's next tokens with the current weights (that pre-update loss is what is recorded), then one
plain SGD step on the chunk's mean next-token loss updates the chosen parameters (clipped to
global norm ``clip`` first), and the next chunk is read with the updated weights. Chunk i is thus
predicted by weights updated through chunk i-1, as in TTT-E2E's inner loop; unlike TTT-E2E the
model was never meta-trained for it (Krause et al., 2019, "Dynamic Evaluation of Transformer
Language Models").

The context is kept the way generation keeps it: a KV cache filled chunk by chunk. Keys and values
of earlier chunks stay as they were computed when those chunks were read (with the weights of that
time); they are not recomputed after an update, and no gradient flows into them. With ``lr=0`` the
losses are therefore exactly the plain model's per-token losses on the whole sequence.

Each row of the batch is its own test-time run (its own copy of the trained weights, ``vmap``):
rows never see each other's updates. The inner loop runs in float32 (gradients and SGD steps) on
a ``lax.scan`` over chunks, under ``jit``.

Usage::

    from jaxeff.ttt.naive import naive_token_losses
    losses = naive_token_losses(model, params, tokens, chunk=64, lr=1e-2, clip=1.0,
                                trainable="mlp_last_quarter")   # [batch, seq - 1]
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxeff.errors import ConfigError
from jaxeff.models.transformer import Transformer, init_cache

__all__ = ["PRESETS", "trainable_paths", "dynamic_eval", "naive_token_losses"]

# named choices of the parameters updated at test time; anything else is a regex over "a/b/c" paths
PRESETS = ("mlp_last_quarter", "mlp", "all")


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def trainable_paths(params, trainable: str | Callable[[str], bool], n_layers: int) -> list[tuple]:
    """Flat keys (tuples) of the parameters updated at test time, in tree order.

    ``trainable``: ``"mlp_last_quarter"`` (the MLPs of the last ceil(n_layers / 4) blocks, where
    TTT-E2E puts its fast weights), ``"mlp"`` (every block's MLP), ``"all"``, a regex searched in the
    slash-joined path (``"layers_3/mlp/(gate|up)"``), or a function ``path -> bool``.
    """
    flat = traverse_util.flatten_dict(params)
    if callable(trainable):
        chosen = [k for k in flat if trainable(_path(k))]
    elif not isinstance(trainable, str) or not trainable:
        raise ConfigError(f"trainable: expected one of {', '.join(PRESETS)}, a regex or a function (got {trainable!r})")
    elif trainable == "all":
        chosen = list(flat)
    elif trainable in ("mlp", "mlp_last_quarter"):
        first = n_layers - math.ceil(n_layers / 4) if trainable == "mlp_last_quarter" else 0
        layers = {f"layers_{i}" for i in range(first, n_layers)}
        chosen = [k for k in flat if k[0] in layers and len(k) > 1 and k[1] == "mlp"]
    else:
        try:
            pattern = re.compile(trainable)
        except re.error as e:
            raise ConfigError(f"trainable: '{trainable}' is not a valid regex ({e})") from None
        chosen = [k for k in flat if pattern.search(_path(k))]
    if not chosen:
        raise ConfigError(f"trainable: {trainable!r} matches no parameter (paths look like '{_path(next(iter(flat)))}')")
    return chosen


def _check(tokens, chunk, lr, clip):
    if getattr(tokens, "ndim", None) != 2 or tokens.shape[1] < 2:
        raise ConfigError(f"tokens: expected int [batch, seq] with seq >= 2 (got shape {getattr(tokens, 'shape', None)})")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk: expected a positive number of tokens (got {chunk!r})")
    if isinstance(lr, (int, float)) and not lr >= 0:
        raise ConfigError(f"lr: expected a non-negative learning rate (got {lr!r})")
    if clip is not None and not clip > 0:
        raise ConfigError(f"clip: expected a positive global-norm bound or None (got {clip!r})")


def dynamic_eval(
    model: Transformer,
    params,
    tokens: jax.Array,
    *,
    chunk: int,
    lr: float,
    clip: float | None = 1.0,
    trainable: str | Callable[[str], bool] = "mlp_last_quarter",
):
    """Read ``tokens [batch, seq]`` chunk by chunk, updating the chosen parameters by SGD.

    Returns ``(losses, updated)``: ``losses [batch, seq - 1]`` float32, ``losses[:, j]`` the
    pre-update next-token loss of ``tokens[:, j + 1]``; ``updated`` the trainable parameters after
    the last chunk, a flat dict ``{path tuple: [batch, ...]}`` (one copy per row).
    """
    _check(tokens, chunk, lr, clip)
    paths = tuple(trainable_paths(params, trainable, model.config.n_layers))
    return _dynamic_eval(
        model,
        params,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(lr, jnp.float32),
        jnp.asarray(jnp.inf if clip is None else clip, jnp.float32),
        chunk=chunk,
        paths=paths,
    )


def naive_token_losses(
    model: Transformer,
    params,
    tokens: jax.Array,
    *,
    chunk: int,
    lr: float,
    clip: float | None = 1.0,
    trainable: str | Callable[[str], bool] = "mlp_last_quarter",
):
    """Per-token losses ``[batch, seq - 1]`` of dynamic evaluation (see :func:`dynamic_eval`)."""
    return dynamic_eval(model, params, tokens, chunk=chunk, lr=lr, clip=clip, trainable=trainable)[0]


@functools.partial(jax.jit, static_argnames=("model", "chunk", "paths"))
def _dynamic_eval(model, params, tokens, lr, clip, *, chunk, paths):
    b, t = tokens.shape
    n_chunks = -(-(t - 1) // chunk)
    padded = n_chunks * chunk
    pad = padded - (t - 1)
    inputs = jnp.pad(tokens[:, :-1], ((0, 0), (0, pad))).reshape(b, n_chunks, chunk)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n_chunks, chunk)
    valid = jnp.pad(jnp.ones((t - 1,), jnp.float32), (0, pad)).reshape(n_chunks, chunk)

    flat = traverse_util.flatten_dict(params)
    fast0 = {k: flat[k].astype(jnp.float32) for k in paths}
    slow = {k: v for k, v in flat.items() if k not in fast0}
    dtypes = {k: flat[k].dtype for k in paths}

    def chunk_loss(fast, cache, inp, tgt, val):
        p = traverse_util.unflatten_dict({**slow, **{k: v.astype(dtypes[k]) for k, v in fast.items()}})
        out = model.apply({"params": p}, inp[None], cache=cache)
        logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[:, None], axis=-1)[:, 0]  # [chunk]
        return jnp.sum(nll * val) / jnp.maximum(jnp.sum(val), 1.0), (nll, out.cache)

    grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

    def one_row(row_inputs, row_targets):
        cache = init_cache(model.config, 1, padded)

        def body(carry, xs):
            fast, cache = carry
            inp, tgt, val = xs
            (_, (nll, cache)), g = grad_fn(fast, cache, inp, tgt, val)
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in g.values()))
            scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12))
            fast = {k: fast[k] - lr * scale * g[k] for k in fast}
            return (fast, cache), nll

        (fast, _), nll = jax.lax.scan(body, (fast0, cache), (row_inputs, row_targets, valid))
        return nll.reshape(padded)[: t - 1], fast

    losses, fast = jax.vmap(one_row)(inputs, targets)
    return losses, fast
