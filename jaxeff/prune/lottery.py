"""Lottery tickets (Frankle & Carbin 2019) by iterative magnitude pruning, with rewinding (Frankle et al. 2020).

One run does every round: ``train.steps`` is ``rounds + 1`` training phases of ``steps_per_round``
steps. Phase 0 trains the dense model; at the end of phase ``i`` (a training hook at step
``(i + 1) * steps_per_round``, for ``i < rounds``) the method

1. prunes by magnitude so that ``round(N * (1 - prune_fraction) ** (i + 1))`` of the ``N`` prunable
   weights survive — per kernel (``scope: layer``: each kernel keeps that share of its own weights) or
   over all prunable kernels at once (``scope: global``); weights pruned earlier stay pruned;
2. resets every weight to its value at the rewind point (``reinit: rewind``; ``rewind_step: 0`` is the
   initialisation — or ``train.init_from``'s parameters —, ``k > 0`` the weights after step ``k``) or to a
   fresh random initialisation (``reinit: random``, the control: seed ``seed + 1`` folded with the
   round), the pruned ones to 0;
3. resets the optimizer state; the learning-rate schedule (``optim``, over ``steps_per_round`` steps)
   starts again, so every phase trains as phase 0 did.

With ``masks_from: RUN`` the masks of round ``i`` are read from that lottery run's
``lottery/masks_<i>.npz`` instead of being computed: the paper's control "the winning ticket's masks,
randomly re-initialised" is ``reinit: random, masks_from: runs/lottery``.

The trained tree is ``{"model": weights, "mask": {<dense path>: {"kernel": 0/1}}, "rewind": weights}``
(``rewind`` only with ``reinit: rewind``). Only ``model`` is trainable; ``mask`` and ``rewind`` are
checkpointed with the state, so a run stopped or killed anywhere resumes to the same masks. The loss and
``model_params`` use ``weights * mask``; the optimizer's updates are masked too, and the pruned weights
are stored as exact zeros, so nothing revives them (Adam's moments are reset at the rewind, so they
hold nothing for a pruned weight).

Prunable: the block Dense kernels (attention q/k/v/o and MLP gate/up/down, ``targets``: a regex over
Dense paths). The embedding (tied with the LM head by default), norms and biases are not pruned and
not counted in the sparsity; they are rewound all the same.

At each phase end the run logs ``lottery/round_end/{eval_loss,sparsity,round}`` (the phase's final eval
loss at the sparsity it trained at) and ``lottery/sparsity`` (of the next phase) to TensorBoard, and
writes ``<run>/lottery.json`` (one record per phase) and ``<run>/lottery/masks_<i>.npz``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from jaxeff.errors import ConfigError, JaxeffError
from jaxeff.prune.wanda import TARGETS
from jaxeff.quant.intercept import dense_paths
from jaxeff.schema import Section
from jaxeff.train.methods import Method, MethodContext, lm_forward_loss, register_method
from jaxeff.train.optim import make_optimizer, make_schedule


class LotteryConfig(Section):
    """Iterative magnitude pruning with rewinding (method ``lottery``)."""

    rounds: int = Field(3, gt=0)  # prunings; the run trains rounds + 1 phases (phase 0 dense)
    prune_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # share of the remaining prunable weights pruned per round
    steps_per_round: int | None = Field(None, gt=0)  # null: train.steps / (rounds + 1)
    rewind_step: int = Field(0, ge=0)  # survivors reset to their values after this step (0 = initialisation)
    scope: Literal["layer", "global"] = "layer"  # per kernel, or one magnitude threshold over all prunable kernels
    targets: str = TARGETS  # regex over Dense paths: the prunable kernels (default: block projections)
    reinit: Literal["rewind", "random"] = "rewind"  # random: the control (same procedure, fresh random weights)
    masks_from: str | None = None  # a lottery run folder: use its masks of each round instead of pruning


# ------------------------------------------------------------------------------------------------
# masks as trees (pure functions; the mask tree mirrors the model tree down to each pruned "kernel")


def prunable_paths(params, pattern: str = TARGETS) -> list[str]:
    """Dense paths whose kernels are pruned (ConfigError naming ``lottery.targets`` when none)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"lottery.targets: {pattern!r} is not a valid regex ({e})") from None
    paths = dense_paths(params, pattern)
    if not paths:
        raise ConfigError(f"lottery.targets: no Dense layer matches {pattern!r}")
    return paths


def _nest(paths: list[str], leaf) -> dict:
    tree: dict = {}
    for p in paths:
        node = tree
        for k in p.split("/"):
            node = node.setdefault(k, {})
        node["kernel"] = leaf(p)
    return tree


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _flat(masks) -> list[tuple[tuple[str, ...], Any]]:
    """``[(keys from the root to 'kernel', leaf)]`` of a mask-shaped tree, in a fixed order."""
    return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(masks)[0]]


def dense_masks(params, paths: list[str]) -> dict:
    """All-ones masks (nothing pruned) for the kernels at ``paths``, in each kernel's dtype."""

    def ones(p):
        k = _get(params, p.split("/") + ["kernel"])
        return jnp.ones(k.shape, k.dtype)

    return _nest(paths, ones)


def mask_axes(model_axes, paths: list[str]) -> dict:
    """Logical axes of the mask tree: each mask is sharded like its kernel."""
    return _nest(paths, lambda p: _get(model_axes, p.split("/") + ["kernel"]))


def apply_masks(params, masks):
    """``params`` with every masked kernel multiplied by its mask (pruned entries exactly 0)."""
    out = params
    for keys, m in _flat(masks):
        out = _set(out, keys, jnp.where(m != 0, _get(out, keys), jnp.zeros((), _get(out, keys).dtype)))
    return out


def _set(tree: dict, keys, value) -> dict:
    new = dict(tree)
    new[keys[0]] = _set(tree[keys[0]], keys[1:], value) if len(keys) > 1 else value
    return new


def count(masks) -> tuple[jax.Array, int]:
    """``(kept weights, prunable weights)`` of a mask tree."""
    leaves = [m for _, m in _flat(masks)]
    return sum(jnp.sum(m != 0, dtype=jnp.int32) for m in leaves), sum(int(np.prod(m.shape)) for m in leaves)


def keep_counts(masks, keep: float, scope: str) -> jax.Array:
    """How many weights survive a round whose cumulative kept share is ``keep``: one count per kernel
    (``scope: layer``, ``round(size * keep)``) or one over all of them (``global``), as int32 ``[k]``."""
    sizes = [int(np.prod(m.shape)) for _, m in _flat(masks)]
    if scope == "global":
        sizes = [sum(sizes)]
    return jnp.asarray([int(round(s * keep)) for s in sizes], jnp.int32)


def _keep_top(scores: jax.Array, k: jax.Array) -> jax.Array:
    """True at the ``k`` highest of the flat ``scores`` (ties: the higher index first, as a stable sort)."""
    n = scores.shape[0]
    order = jnp.argsort(scores, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # 0 = lowest
    return rank >= n - k


def magnitude_masks(params, masks, counts: jax.Array, scope: str) -> dict:
    """New masks keeping the ``counts`` largest ``|w|`` among the weights the current ``masks`` keep
    (pruned weights score below every survivor, so they stay pruned)."""
    flat = _flat(masks)
    scores = [jnp.where(m != 0, jnp.abs(_get(params, keys).astype(jnp.float32)), -1.0).reshape(-1) for keys, m in flat]
    if scope == "global":
        kept = _keep_top(jnp.concatenate(scores), counts[0])
        bounds = np.cumsum([s.shape[0] for s in scores])[:-1]
        parts = jnp.split(kept, bounds)
    else:
        parts = [_keep_top(s, counts[i]) for i, s in enumerate(scores)]
    out = masks
    for (keys, m), part in zip(flat, parts):
        out = _set(out, keys, part.reshape(m.shape).astype(m.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# rounds


def round_plan(cfg) -> int:
    """``steps_per_round`` after checking it against ``train.steps``, ``rounds`` and ``rewind_step``."""
    c, steps = cfg.lottery, cfg.train.steps
    phases = c.rounds + 1
    per = c.steps_per_round or steps // phases
    if c.steps_per_round and per * phases != steps:
        raise ConfigError(f"lottery.steps_per_round: train.steps={steps} must equal (rounds + 1) * steps_per_round = {phases} * {per} = {phases * per}")
    if per < 1 or per * phases != steps:
        raise ConfigError(
            f"lottery.rounds: train.steps={steps} does not split into rounds + 1 = {phases} equal phases "
            f"(set train.steps to a multiple of {phases}, or lottery.steps_per_round)"
        )
    if c.rewind_step >= per:
        raise ConfigError(f"lottery.rewind_step: {c.rewind_step} must be below steps_per_round={per} (the rewind point lies in the dense phase)")
    return per


def masks_file(run: str | Path, round_: int) -> Path:
    return Path(run) / "lottery" / f"masks_{round_}.npz"


def _check_masks_from(run: str, rounds: int) -> None:
    missing = [i for i in range(1, rounds + 1) if not masks_file(run, i).is_file()]
    if missing:
        raise ConfigError(
            f"lottery.masks_from: '{run}' has no masks for round(s) {missing} "
            f"(expected {masks_file(run, missing[0])}, written by a lottery run with at least "
            f"{rounds} rounds)"
        )


def save_masks(path: Path, masks) -> None:
    """Write a mask tree as ``.npz`` (keys: the kernels' '/'-paths), atomically."""
    host = {"/".join(keys): _host(m) != 0 for keys, m in _flat(masks)}
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **host)
    os.replace(tmp, path)


def load_masks(path: Path, like) -> dict:
    """A mask tree shaped like ``like`` from :func:`save_masks`' file (one line naming a mismatch)."""
    with np.load(path) as f:
        saved = dict(f)
    out = like
    for keys, m in _flat(like):
        name = "/".join(keys)
        if name not in saved or saved[name].shape != tuple(m.shape):
            got = saved[name].shape if name in saved else "nothing"
            raise ConfigError(f"lottery.masks_from: '{path}' has {got} for {name}, expected a mask {tuple(m.shape)}")
        out = _set(out, keys, jnp.asarray(saved[name], m.dtype))
    return out


def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


class Rounds:
    """The two training hooks: the rewind copy (at ``rewind_step`` > 0) and the end of each phase."""

    def __init__(self, cfg, model, paths: list[str], steps_per_round: int):
        self.cfg, self.c, self.model, self.paths, self.per = cfg, cfg.lottery, model, paths, steps_per_round
        self._jits: dict[str, Any] = {}

    def _jit(self, name, fn, trainer, *extra_shardings):
        if name not in self._jits:
            shard = trainer.state_shardings
            self._jits[name] = jax.jit(fn, in_shardings=(shard, *extra_shardings), out_shardings=shard, donate_argnums=(0,))
        return self._jits[name]

    def rewind_hook(self, loop) -> None:
        if loop.step != self.c.rewind_step:
            return

        def copy(state):
            return state.replace(params={**state.params, "rewind": jax.tree.map(jnp.copy, state.params["model"])})

        with loop.trainer._context():
            loop.state = self._jit("rewind", copy, loop.trainer)(loop.state)
        loop.logger.message(f"lottery: rewind point saved at step {loop.step}")

    def round_hook(self, loop) -> None:
        step, c = loop.step, self.c
        if step % self.per or step == 0:
            return
        ended = step // self.per - 1  # the phase that just ended (its weights were pruned `ended` times)
        kept, total = (int(x) for x in jax.device_get(count(loop.state.params["mask"])))
        self._check_round(loop, ended, kept)
        ev = loop.evaluate()
        sparsity = 1.0 - kept / total
        record = {"round": ended, "end_step": step, "sparsity": sparsity, "kept": kept, "prunable": total, "eval_loss": ev.get("eval/loss"), "eval": ev}
        logs = {
            "lottery/round_end/eval_loss": ev.get("eval/loss", float("nan")),
            "lottery/round_end/sparsity": sparsity,
            "lottery/round_end/round": float(ended),
        }
        if ended < c.rounds:
            loop.state = self._next_round(loop, ended + 1)
            kept_now, _ = (int(x) for x in jax.device_get(count(loop.state.params["mask"])))
            logs["lottery/sparsity"] = 1.0 - kept_now / total
            save_masks(masks_file(self.cfg.run_path, ended + 1), loop.state.params["mask"])
            loop.logger.message(
                f"lottery: round {ended + 1} of {c.rounds} at step {step}: phase {ended} ended at "
                f"sparsity {sparsity:.3f}, eval loss {ev.get('eval/loss', float('nan')):.4f}; now "
                f"{kept_now:,} of {total:,} prunable weights kept ({1 - kept_now / total:.3f} pruned), "
                f"{'rewound' if c.reinit == 'rewind' else 'randomly re-initialised'}"
            )
        loop.logger.scalars(step, logs)
        loop.last.update(logs)
        self._write_record(record)
        loop.reset_clock()

    def _check_round(self, loop, ended: int, kept: int) -> None:
        """The state must hold the masks of phase ``ended``; otherwise a transition was skipped (e.g. a run
        resumed from a checkpoint written at a round boundary before the transition ran): fail loudly."""
        c, masks = self.c, loop.state.params["mask"]
        if ended == 0:
            expected = int(count(masks)[1])
        elif c.masks_from:
            expected = int(count(load_masks(masks_file(c.masks_from, ended), masks))[0])
        else:
            expected = int(jnp.sum(keep_counts(masks, (1.0 - c.prune_fraction) ** ended, c.scope)))
        if kept != expected:
            raise JaxeffError(
                f"lottery: at step {loop.step} the state keeps {kept:,} prunable weights, but phase {ended} "
                f"keeps {expected:,}: a round transition was skipped "
                "(resumed from a checkpoint written before it ran?)"
            )

    def _next_round(self, loop, round_: int):
        c, trainer = self.c, loop.trainer
        keep = (1.0 - c.prune_fraction) ** round_
        mask_shardings = trainer.param_shardings["mask"]
        if c.masks_from:
            given = jax.device_put(load_masks(masks_file(c.masks_from, round_), loop.state.params["mask"]), mask_shardings)
        else:
            given = None
        counts = keep_counts(loop.state.params["mask"], keep, c.scope)
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed + 1), round_)
        model, seq, tx, scope, random = self.model, self.cfg.data.seq_len, trainer.tx, c.scope, c.reinit == "random"

        def transition(state, counts, given, key):
            from jaxeff.models import init_params

            p = state.params
            masks = given if given is not None else magnitude_masks(p["model"], p["mask"], counts, scope)
            start = init_params(model, key, (1, seq)) if random else p["rewind"]
            params = {**p, "model": apply_masks(start, masks), "mask": masks}
            return state.replace(params=params, opt_state=tx.init(params))

        rep = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
        fn = self._jit("round" if given is None else "round_given", transition, trainer, rep, None if given is None else mask_shardings, rep)
        with trainer._context():
            return fn(loop.state, counts, given, key)

    def _write_record(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        path = self.cfg.run_path / "lottery.json"
        rows = json.loads(path.read_text())["rounds"] if path.is_file() else []
        rows = [r for r in rows if r["round"] < record["round"]] + [record]
        head = {k: getattr(self.c, k) for k in LotteryConfig.model_fields}
        head["steps_per_round"] = self.per
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"lottery": head, "rounds": rows}, indent=1))
        os.replace(tmp, path)


def read_record(run: str | Path) -> dict:
    """``<run>/lottery.json``: the settings and one record per finished phase (round, sparsity, eval loss)."""
    path = Path(run) / "lottery.json"
    if not path.is_file():
        raise ConfigError(f"lottery: '{path}' does not exist (not a lottery run, or no phase has ended yet)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# the method


def mask_updates():
    """An optax transformation that zeroes the updates of pruned weights (``params["mask"]`` False)."""
    import optax

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("lottery: the masked optimizer needs the parameters")
        return {**updates, "model": apply_masks(updates["model"], params["mask"])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@register_method("lottery", config=LotteryConfig)
def lottery_method(ctx: MethodContext) -> Method:
    """Iterative magnitude pruning with rewinding; see the module docstring."""
    import optax
    from flax.core import unfreeze

    cfg, model = ctx.cfg, ctx.model
    c = cfg.lottery
    per = round_plan(cfg)
    if c.masks_from:
        _check_masks_from(c.masks_from, c.rounds)
    paths = prunable_paths(unfreeze(ctx.abstract_params), c.targets)
    rounds = Rounds(cfg, model, paths, per)
    rewind = c.reinit == "rewind"

    def prepare_params(base, rng):
        out = {"model": base, "mask": dense_masks(base, paths)}
        if rewind:
            out["rewind"] = jax.tree.map(jnp.copy, base)
        return out

    def model_params(params):
        return apply_masks(params["model"], params["mask"])

    phase_lr = make_schedule(cfg.optim, per)

    def loss(params, batch, rng, *, frozen, deterministic, step):
        value, _ = lm_forward_loss(model, model_params(params), batch, rng, deterministic)
        kept, total = count(params["mask"])
        # the learning rate of this update: the schedule restarts every phase (train/lr too: Method.schedule)
        return value, {"lottery/sparsity": 1.0 - kept.astype(jnp.float32) / total, "lottery/lr": phase_lr(step % per)}

    def trainable(params):
        return {k: jax.tree.map(lambda _: k == "model", v) for k, v in params.items()}

    def logical_axes(model_axes):
        out = {"model": model_axes, "mask": mask_axes(model_axes, paths)}
        if rewind:
            out["rewind"] = model_axes
        return out

    def optimizer(optim_cfg, total_steps, trainable_tree):
        # the schedule spans one phase: the optimizer state (and so its step count) is reset at each rewind
        return optax.chain(make_optimizer(optim_cfg, per, trainable_tree), mask_updates())

    from jaxeff.train.loop import Hook

    hooks = [Hook("lottery_round", per, rounds.round_hook, at_end=False)]
    if rewind and c.rewind_step > 0:
        hooks.insert(0, Hook("lottery_rewind", c.rewind_step, rounds.rewind_hook, at_end=False))
    return Method(
        "lottery",
        loss,
        trainable=trainable,
        prepare_params=prepare_params,
        logical_axes=logical_axes,
        schedule=lambda step: phase_lr(step % per),
        model_params=model_params,
        optimizer=optimizer,
        hooks=tuple(hooks),
        with_step=True,
    )


def sparsity_after(rounds: int, prune_fraction: float) -> float:
    """The pruned share of the prunable weights after ``rounds`` rounds: ``1 - (1 - p) ** rounds``."""
    return 1.0 - (1.0 - prune_fraction) ** rounds


__all__ = [
    "LotteryConfig",
    "lottery_method",
    "prunable_paths",
    "dense_masks",
    "apply_masks",
    "magnitude_masks",
    "keep_counts",
    "count",
    "round_plan",
    "save_masks",
    "load_masks",
    "masks_file",
    "read_record",
    "mask_updates",
    "sparsity_after",
    "Rounds",
]
