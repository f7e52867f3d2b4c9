"""Pure train / eval steps: ``step(state, batch) -> (state, metrics)``, jitted by the loop."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxeff.train.losses import cross_entropy
from jaxeff.train.methods import Method


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    extra: Any  # method state (checkpointed)
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)


def init_state(params, tx: optax.GradientTransformation, method: Method, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      extra=method.init_extra(params), rng=jax.random.PRNGKey(seed))


def make_train_step(method: Method, tx: optax.GradientTransformation, grad_accum: int = 1):
    """One optimizer update. With ``grad_accum > 1`` the batch is split into that many
    micro-batches (rows), their gradients averaged in a ``lax.scan``, and one update applied."""
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen=None):
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng, extra=state.extra, frozen=frozen,
                                                    deterministic=False)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, inp):
                i, mb = inp
                (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), extra=state.extra,
                                    frozen=frozen, deterministic=False)
                acc_l, acc_m, acc_g = carry
                return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            _, m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng,
                                                        extra=state.extra, frozen=frozen, deterministic=False)[0])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (loss, metrics, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros_m, zeros_g),
                                                     (jnp.arange(grad_accum), micro))
            loss, metrics = loss / grad_accum, jax.tree.map(lambda x: x / grad_accum, metrics)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        trainable = method.trainable(state.params)
        grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return train_step


def make_eval_step(model, method: Method):
    """``eval_step(params, batch) -> (sum of token losses, number of tokens)`` for exact means
    over many batches; the model runs as ``method.run`` says."""

    def eval_step(params, batch):
        out = method.run(model, params, batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], deterministic=True)
        loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return loss * n, n

    return eval_step
