"""Activation addition: a steering vector from two contrasting prompts, added to the residual stream.

``record(model, params, pos, neg, layer)`` runs each prompt (token ids, BOS first) through the model
and takes the residual stream after block ``layer`` (``hidden_states[layer + 1]``), averaged over the
prompt's tokens after the first (position 0 is BOS in every prompt, so its state is the same for
both and carries no contrast); with several prompts per side each side is the mean over its prompts.
The vector is ``mean(pos) - mean(neg)`` ``[d_model]``.

``steered_apply(layer, inner)`` is an ``apply_fn(model, params, tokens, **kwargs)`` (the signature
:func:`jaxeff.models.generate.generate` and ``Method.run`` use) for ``params = {"model": model
params, "steer": scale * vector}``: the output of block ``layer`` becomes ``x + scale * v`` at every
position, for full forward passes and for every KV-cache step alike (the block's ``__call__`` is
wrapped with ``flax.linen.intercept_methods``; the model is not edited). The vector is an input,
not a constant, so one compiled generation serves every scale and vector.

    v = record(model, params, [pos_ids], [neg_ids], layer=1)
    new = steer_generate(model, params, prompt, rng, vector=v, layer=1, scale=4.0, max_new_tokens=64)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import JaxeffError
from jaxeff.models.generate import generate

FORMAT = "jaxeff-steering-vector/1"


def _plain_apply(model, params, tokens, **kwargs):
    return model.apply({"params": params}, tokens, **kwargs)


def check_layer(layer: int, n_layers: int, key: str = "layer") -> None:
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise JaxeffError(f"{key}: expected a block index in 0..{n_layers - 1} (got {layer})")


def residual_stream(model, params, tokens, layer: int, apply_fn: Callable | None = None) -> jax.Array:
    """The residual stream after block ``layer``: ``[batch, seq, d_model]`` (float32)."""
    check_layer(layer, model.config.n_layers)
    return _residual(model, params, jnp.asarray(tokens, jnp.int32), layer, apply_fn)


@functools.partial(jax.jit, static_argnames=("model", "layer", "apply_fn"))
def _residual(model, params, tokens, layer, apply_fn):
    out = (apply_fn or _plain_apply)(model, params, tokens, return_hidden=True)
    return out.hidden_states[layer + 1].astype(jnp.float32)


def _mean_state(model, params, prompts: Sequence[Sequence[int]], layer: int, apply_fn, side: str) -> jax.Array:
    """Mean over prompts of each prompt's mean state after BOS. The prompts run as one batch, padded
    on the right: in a causal model padding never changes the states of the positions before it."""
    if not prompts:
        raise JaxeffError(f"{side}: expected at least one prompt")
    for i, ids in enumerate(prompts):
        if len(ids) < 2:
            raise JaxeffError(f"{side}[{i}]: a prompt needs at least one token after BOS")
    longest = max(len(ids) for ids in prompts)
    if longest > model.config.max_seq_len:
        raise JaxeffError(f"{side}: a prompt of {longest} tokens is longer than max_seq_len={model.config.max_seq_len}")
    tokens = np.zeros((len(prompts), longest), np.int32)
    mask = np.zeros((len(prompts), longest), np.float32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
        mask[i, 1 : len(ids)] = 1.0
    h = residual_stream(model, params, tokens, layer, apply_fn)  # [prompts, seq, d_model]
    per_prompt = jnp.sum(h * mask[..., None], axis=1) / mask.sum(axis=1)[:, None]
    return jnp.mean(per_prompt, axis=0)


def record(model, params, pos: Sequence[Sequence[int]], neg: Sequence[Sequence[int]], layer: int, apply_fn: Callable | None = None) -> jax.Array:
    """Steering vector ``[d_model]``: mean residual stream after block ``layer`` of the ``pos``
    prompts minus that of the ``neg`` prompts (token ids, BOS first; positions after BOS)."""
    check_layer(layer, model.config.n_layers)
    return _mean_state(model, params, pos, layer, apply_fn, "pos") - _mean_state(model, params, neg, layer, apply_fn, "neg")


def record_text(model, params, tokenizer, pos: Sequence[str], neg: Sequence[str], layer: int, apply_fn: Callable | None = None) -> jax.Array:
    """:func:`record` from text prompts (BOS + the tokenizer's ids, as ``jaxeff generate`` does)."""
    enc = lambda texts: [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    return record(model, params, enc(pos), enc(neg), layer, apply_fn)


def _interceptor(layer: int, delta):
    name = f"layers_{layer}"

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and tuple(mod.path) == (name,):
            x, *rest = out  # a block returns (x [batch, seq, d_model], cache, ...)
            return (x + delta.astype(x.dtype), *rest)
        return out

    return intercept


@functools.lru_cache(maxsize=64)
def steered_apply(layer: int, inner: Callable | None = None) -> Callable:
    """``apply_fn`` for ``params = {"model": ..., "steer": scale * vector}`` that adds the vector to
    the output of block ``layer`` (``inner`` runs the model, default ``model.apply``). Cached, so
    ``generate``'s jit (``apply_fn`` is static) compiles once per (layer, inner)."""
    run = inner or _plain_apply

    def apply(model, params, tokens, **kwargs):
        with nn.intercept_methods(_interceptor(layer, params["steer"])):
            return run(model, params["model"], tokens, **kwargs)

    return apply


def _delta(model, vector, scale) -> jax.Array:
    v = jnp.asarray(vector, jnp.float32)
    if v.shape != (model.config.d_model,):
        raise JaxeffError(f"steering vector: shape {tuple(v.shape)}, expected ({model.config.d_model},) (d_model)")
    return jnp.float32(scale) * v


def steered_forward(model, params, tokens, *, vector, layer: int, scale: float, apply_fn: Callable | None = None, return_hidden: bool = False):
    """The model's output (jitted) with ``scale * vector`` added after block ``layer`` at every position."""
    check_layer(layer, model.config.n_layers)
    return _steered_forward(
        model, {"model": params, "steer": _delta(model, vector, scale)}, jnp.asarray(tokens, jnp.int32), layer, apply_fn, return_hidden
    )


@functools.partial(jax.jit, static_argnames=("model", "layer", "apply_fn", "return_hidden"))
def _steered_forward(model, params, tokens, layer, apply_fn, return_hidden):
    return steered_apply(layer, apply_fn)(model, params, tokens, return_hidden=return_hidden)


def steer_generate(
    model,
    params,
    prompt,
    rng,
    *,
    vector,
    layer: int,
    scale: float,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    apply_fn: Callable | None = None,
) -> jax.Array:
    """:func:`jaxeff.models.generate.generate` with the residual stream after block ``layer``
    shifted by ``scale * vector`` at every position (prefill and each cached step)."""
    check_layer(layer, model.config.n_layers)
    return generate(
        model,
        {"model": params, "steer": _delta(model, vector, scale)},
        jnp.asarray(prompt, jnp.int32),
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        apply_fn=steered_apply(layer, apply_fn),
    )


# ------------------------------------------------------------------------------------------------
# vector files


def save_vector(path, vector, *, layer: int, pos: Sequence[str] = (), neg: Sequence[str] = (), run: str | None = None) -> Path:
    """``.npz`` with the vector ``[d_model]`` and a JSON record (layer, prompts, run)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "layer": int(layer), "d_model": int(np.shape(vector)[0]), "pos": list(pos), "neg": list(neg), "run": run}
    with open(p, "wb") as f:
        np.savez(f, vector=np.asarray(jax.device_get(vector), np.float32), meta=np.asarray(json.dumps(meta)))
    return p


def load_vector(path, key: str = "--steer-vector") -> tuple[np.ndarray, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise JaxeffError(f"{key}: '{p}' does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            vector, meta = np.asarray(z["vector"], np.float32), json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise JaxeffError(f"{key}: '{p}' is not a steering vector file ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise JaxeffError(f"{key}: '{p}' has format {meta.get('format')!r}, expected {FORMAT}")
    return vector, meta


__all__ = ["check_layer", "residual_stream", "record", "record_text", "steered_apply", "steered_forward", "steer_generate", "save_vector", "load_vector"]
