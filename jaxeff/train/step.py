"""Pure train / eval steps: ``step(state, batch) -> (state, metrics)``, jitted by the loop."""

from __future__ import annotations

import functools
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
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
    # non-finite guard (see make_train_step)
    skipped: jax.Array  # int32: updates dropped because the loss or gradient norm was not finite
    bad_streak: jax.Array  # int32: consecutive such steps
    halted_at: jax.Array  # int32: the 1-based step that halted training, or -1


def init_state(params, tx: optax.GradientTransformation, method: Method, seed: int) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(seed), skipped=zero, bad_streak=zero, halted_at=zero - 1)


def make_train_step(
    method: Method,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    *,
    nonfinite: str = "skip",
    max_skips: int = 10,
    inject_nan_at: int | None = None,
):
    """One optimizer update. With ``grad_accum > 1`` the batch is split into that many
    micro-batches (rows), their gradients averaged in a ``lax.scan``, and one update applied.

    Non-finite guard, inside the step (no host sync): when the loss, the gradient norm or any updated
    trainable parameter is NaN/Inf the update is dropped (``skipped`` counts it). ``nonfinite="stop"``
    halts at the first such step, ``"skip"`` after ``max_skips`` consecutive ones: ``halted_at`` records the step, and from then on
    the state no longer changes (it is the last good one) until the host notices and checkpoints it.
    ``"off"`` applies every update. ``inject_nan_at`` (tests only) makes that 1-based step's loss NaN.
    """
    limit = 1 if nonfinite == "stop" else max_skips

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen=None):
        rng = jax.random.fold_in(state.rng, state.step)
        loss_fn = functools.partial(method.loss, step=state.step) if method.with_step else method.loss
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng, frozen=frozen, deterministic=False)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, inp):
                i, mb = inp
                (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), frozen=frozen, deterministic=False)
                acc_l, acc_m, acc_g = carry
                return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            _, m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng, frozen=frozen, deterministic=False)[0])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (loss, metrics, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros_m, zeros_g), (jnp.arange(grad_accum), micro))
            loss, metrics = loss / grad_accum, jax.tree.map(lambda x: x / grad_accum, metrics)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        if inject_nan_at is not None:
            poison = jnp.where(state.step + 1 == inject_nan_at, jnp.nan, 1.0)
            loss, grads = loss * poison, jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
        trainable = method.trainable(state.params)
        grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        if nonfinite == "off":
            return new_state, metrics
        # the new parameters too: finite gradients can still overflow into inf parameters (e.g. lr=1e39)
        finite = jax.tree.map(lambda p, t: jnp.all(jnp.isfinite(p)) if t and jnp.issubdtype(p.dtype, jnp.inexact) else jnp.array(True), params, trainable)
        params_ok = jnp.all(jnp.stack(jax.tree.leaves(finite)))
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_ok)
        streak = jnp.where(bad, state.bad_streak + 1, 0)
        running = state.halted_at < 0
        halted_at = jnp.where(running & (streak >= limit), state.step + 1, state.halted_at)
        apply = ~bad & running
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
        new_state = new_state.replace(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=jnp.where(halted_at < 0, state.step + 1, state.step),
            skipped=state.skipped + bad.astype(jnp.int32),
            bad_streak=streak,
            halted_at=halted_at,
        )
        return new_state, metrics

    return train_step


def make_eval_step(model, method: Method):
    """``eval_step(params, batch) -> (sum of token losses, number of tokens)`` for exact means
    over many batches; the model runs as ``method.run`` says."""

    def eval_step(params, batch):
        out = method.run(model, params, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], deterministic=True)
        loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return loss * n, n

    return eval_step
