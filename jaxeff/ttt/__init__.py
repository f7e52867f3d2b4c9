"""End-to-end test-time training (TTT-E2E, method ``ttt_e2e``); see docs/ttt.md.

Stable entry points (used by the long-context study and the latency benchmark):

* :func:`token_losses` ``(cfg, params, tokens) -> [batch, seq - 1]``: per-position next-token loss
  of a ttt_e2e model (pre-update losses, in order: position i's loss uses the fast weights updated
  through the mini-batch before the one holding token i).
* :func:`prefill` ``(cfg, params, tokens) -> (logits, state)``: the inner loop over a prompt; the
  state holds the final fast weights (``state["fast"]``), KV buffers and the pending mini-batch, and
  continues with :func:`jaxeff.ttt.generate.decode_step` / ``Method.run(..., cache=state)``.

The method ``ttt_e2e`` is registered by :mod:`jaxeff.ttt.method` (a built-in method module).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.ttt.config import TTTConfig
from jaxeff.ttt.method import inner_lr_at, ttt_method
from jaxeff.ttt.model import FAST_KERNELS, TTTSpec, has_fast_weights, refuse_fast_weights


def spec_of(cfg) -> TTTSpec:
    """The static description of a ttt_e2e model (validates the ``ttt`` section: ConfigError)."""
    return TTTSpec.from_config(cfg)


@functools.partial(jax.jit, static_argnames=("spec",))
def _token_losses(spec: TTTSpec, params, tokens):
    from jaxeff.ttt.inner import forward
    from jaxeff.ttt.method import pad_to_chunks

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    ones = jnp.ones((batch, t), jnp.int32)
    arrays = pad_to_chunks(spec.mini_batch, inputs, positions, ones, targets, ones.astype(jnp.float32))
    nll, _, _, _ = forward(spec, params, *arrays, spec.inner_lr, segments=False)  # one document per row
    return nll[:, :t]


def token_losses(cfg, params, tokens) -> jax.Array:
    """Per-position next-token loss ``[batch, seq - 1]`` (float32, nats) of a ttt_e2e model with the
    prepared parameter tree ``params`` (as trained / checkpointed) on ``tokens [batch, seq]``: the
    pre-update losses of the inner loop at the full inner rate. ``seq - 1`` need not be a multiple
    of ``ttt.mini_batch`` (the last mini-batch is padded; padding changes no earlier loss)."""
    return _token_losses(spec_of(cfg), params, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "max_len"))
def _prefill(spec: TTTSpec, params, tokens, max_len):
    from jaxeff.ttt.generate import prefill as run

    return run(spec, params, tokens, max_len)


def prefill(cfg, params, tokens, max_len: int | None = None):
    """Run the inner loop over the prompt ``tokens [batch, t]``: ``(logits [batch, t, vocab], state)``.
    ``state["fast"]`` are the fast weights after the last complete mini-batch whose targets are in
    the prompt (``(t - 1) // b`` inner steps); ``max_len`` sizes the KV caches of full-attention
    prefix blocks for decoding afterwards (default ``t``; windowed blocks keep ``window`` slots). See :mod:`jaxeff.ttt.generate` for the state's layout."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return _prefill(spec_of(cfg), params, tokens, max_len or tokens.shape[1])


def adapted_params(params, state, row: int = 0):
    """The prepared parameter tree as adapted at test time for one sequence (``row`` of a
    :func:`prefill` state): the fast MLPs' kernels replaced by that row's fast weights; every other
    leaf (fast norms included) is the trained one."""
    fast = {
        layer: {k: ({"kernel": state["fast"][layer][k][row].astype(v["kernel"].dtype)} if k in FAST_KERNELS else v) for k, v in p.items()}
        for layer, p in params["fast"].items()
    }
    return {**params, "fast": fast}


__all__ = [
    "adapted_params",
    "TTTConfig",
    "TTTSpec",
    "FAST_KERNELS",
    "has_fast_weights",
    "inner_lr_at",
    "prefill",
    "refuse_fast_weights",
    "spec_of",
    "token_losses",
    "ttt_method",
]
