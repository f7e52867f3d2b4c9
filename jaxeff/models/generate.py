"""Autoregressive generation with a KV cache: greedy, temperature and top-k sampling."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.models.transformer import Transformer, init_cache


def check_sampling(temperature, top_k, vocab_size: int | None, names=("--temperature", "--top-k")) -> None:
    """Refuse sampling settings that would sample nonsense or fail inside JAX: ``temperature`` must
    be a finite number >= 0 (a negative one inverts the distribution, NaN samples garbage) and
    ``top_k`` an integer in ``[0, vocab_size]`` (0 = no filter), whether sampling or greedy
    (``vocab_size=None``: not known yet, only the lower bound). ``names`` are how the message
    calls the two settings (command-line options by default)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"{names[0]}: expected >= 0 and finite, 0 = greedy (got {temperature!r})")
    top = vocab_size if vocab_size is not None else math.inf
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= top:
        size = f" {vocab_size}" if vocab_size is not None else ""
        raise ConfigError(f"{names[1]}: expected an integer from 0 (no filter) to the vocabulary size{size} (got {top_k!r})")


def check_seed(seed, name: str = "--seed") -> None:
    """``jax.random.PRNGKey`` takes a 64-bit seed; a larger one is a one-line error, not an OverflowError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**63:
        raise ConfigError(f"{name}: expected an integer from -2**63 to 2**63-1 (got {seed!r})")


def sample_logits(logits: jax.Array, rng, *, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """``logits [batch, vocab]`` -> token ids ``[batch]``. ``temperature == 0`` is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _plain_apply(model, params, tokens, **kwargs):
    return model.apply({"params": params}, tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "apply_fn"))
def generate(
    model: Transformer, params, prompt: jax.Array, rng, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, apply_fn=None
) -> jax.Array:
    """``prompt [batch, prompt_len]`` (all rows the same length) -> new tokens ``[batch, max_new_tokens]``.

    The prompt is run once through the model filling the cache (prefill); each new token then
    costs one single-token forward pass against the cache. ``apply_fn(model, params, tokens,
    **kwargs)`` replaces ``model.apply`` (e.g. ``Method.run`` for adapters or quantized layers).
    """
    check_sampling(temperature, top_k, model.config.vocab_size, names=("temperature", "top_k"))
    apply_fn = apply_fn or _plain_apply
    b, t = prompt.shape
    cache = init_cache(model.config, b, t + max_new_tokens)
    out = apply_fn(model, params, prompt, cache=cache)

    def body(carry, key):
        logits, cache = carry
        tok = sample_logits(logits, key, temperature=temperature, top_k=top_k)
        o = apply_fn(model, params, tok[:, None], cache=cache)
        return (o.logits[:, -1], o.cache), tok

    keys = jax.random.split(rng, max_new_tokens)
    _, toks = jax.lax.scan(body, (out.logits[:, -1], out.cache), keys)
    return toks.T
