"""The training loop: config -> mesh, data, model, method -> jitted sharded steps -> logs, checkpoints.

``Trainer`` holds what is fixed for a run (mesh, model, method, optimizer, shardings, jitted
steps); ``run_training`` adds the data loader, TensorBoard, the progress bar and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.config import ExperimentConfig
from jaxeff.data import dynamic as dyn
from jaxeff.data.loader import eval_batches, process_slice
from jaxeff.data.packing import PACKED_KEYS
from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import Transformer, init_params, logical_axes
from jaxeff.train import sharding as shd
from jaxeff.train.checkpoint import Checkpointer, first_line, abstract_with_shardings, check_same_model
from jaxeff.train.methods import make_method
from jaxeff.train.optim import make_optimizer, make_schedule
from jaxeff.train.step import TrainState, init_state, make_eval_step, make_train_step

# dense bf16 peak FLOP/s per device, by jax device_kind (for MFU)
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def peak_flops_per_device(cfg: ExperimentConfig) -> float | None:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


class Trainer:
    """Everything about a run that does not change from step to step."""

    def __init__(self, cfg: ExperimentConfig, *, devices=None):
        self.cfg = cfg
        self.mesh = shd.build_mesh(cfg.mesh, devices)
        self.rules = cfg.mesh.rules
        div = shd.batch_divisor(self.mesh, self.rules)
        if cfg.data.batch_size % div:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by the {div} batch shards of the mesh")
        per_micro = cfg.data.batch_size // cfg.optim.grad_accum
        if cfg.optim.grad_accum > 1 and per_micro % div:
            raise ConfigError(f"optim.grad_accum: micro-batches of {per_micro} rows do not split over {div} batch shards")
        self.model = Transformer(cfg.model)
        try:
            self.method = make_method(cfg, self.model)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        seq = cfg.data.seq_len
        key = jax.random.PRNGKey(cfg.seed)
        self.base_abstract = jax.eval_shape(lambda: init_params(self.model, key, (1, seq)))
        abstract_params = jax.eval_shape(lambda: self.method.prepare_params(init_params(self.model, key, (1, seq)), key))
        trainable = self.method.trainable(abstract_params)
        make_tx = self.method.optimizer or make_optimizer
        self.tx = make_tx(cfg.optim, cfg.train.steps, trainable)
        self.schedule = make_schedule(cfg.optim, cfg.train.steps)
        model_axes = logical_axes(self.model, (1, seq))
        self.base_shardings = shd.param_shardings(model_axes, self.base_abstract, self.mesh, self.rules)
        self.param_shardings = shd.param_shardings(self.method.logical_axes(model_axes), abstract_params, self.mesh,
                                                   self.rules)
        abstract_state = jax.eval_shape(self._init_fn, self.base_abstract)
        self.state_shardings = shd.shardings_like_params(abstract_state, abstract_params, self.param_shardings,
                                                         self.mesh)
        self.state_shardings = self.state_shardings.replace(params=self.param_shardings)
        self.abstract_state = abstract_with_shardings(abstract_state, self.state_shardings)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        frozen = self.method.frozen
        if frozen is None:
            self.frozen, frozen_shardings = None, None
        else:
            if self.method.frozen_logical_axes is not None:
                frozen_shardings = shd.param_shardings(self.method.frozen_logical_axes, frozen, self.mesh, self.rules)
            else:
                frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
            self.frozen = jax.device_put(frozen, frozen_shardings)
        step_fn = make_train_step(self.method, self.tx, cfg.optim.grad_accum, nonfinite=cfg.train.nonfinite,
                                  max_skips=cfg.train.max_skips, inject_nan_at=cfg.train.inject_nan_at_step)
        self._train_step = jax.jit(step_fn,
                                   in_shardings=(self.state_shardings, self.batch_sharding, frozen_shardings),
                                   out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self._eval_step = jax.jit(make_eval_step(self.model, self.method),
                                  in_shardings=(self.param_shardings, self.batch_sharding),
                                  out_shardings=(replicated, replicated))
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
        self.n_trainable = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(abstract_params),
                                                                      jax.tree.leaves(trainable)) if t)
        # optimizer state bytes (frozen leaves have none); trainable share of the model's parameters
        self.opt_state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                   for x in jax.tree.leaves(abstract_state.opt_state))
        self.trainable_pct = 100.0 * self.n_trainable / cfg.model.param_count()

    def _init_fn(self, base_params=None):
        key = jax.random.PRNGKey(self.cfg.seed)
        if base_params is None:
            base_params = init_params(self.model, key, (1, self.cfg.data.seq_len))
        params = self.method.prepare_params(base_params, jax.random.fold_in(key, 1))
        return init_state(params, self.tx, self.method, self.cfg.seed)

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, base_params=None) -> TrainState:
        """A fresh train state; ``base_params`` (model parameters, e.g. from ``train.init_from``)
        replace the random initialisation."""
        with self._context():
            if base_params is None:
                return jax.jit(self._init_fn, out_shardings=self.state_shardings)()
            return jax.jit(self._init_fn, in_shardings=(self.base_shardings,),
                           out_shardings=self.state_shardings)(base_params)

    def load_base_params(self, path) -> Any:
        """Model parameters of another run's checkpoint (same architecture) for ``train.init_from``;
        ``hf:PATH`` reads a Hugging Face folder whose config.json must match the ``model`` section."""
        from jaxeff.train.checkpoint import find_checkpoint_dir

        if str(path).startswith("hf:"):
            from jaxeff.interop.hf import load_for_run

            return load_for_run(str(path)[3:], self.cfg.model, self.base_abstract, self.base_shardings)

        ckpt = Checkpointer(find_checkpoint_dir(path), create=False)
        try:
            check_same_model(ckpt.read_config(), self.cfg.to_dict()["model"], ckpt.directory)
            return ckpt.restore_params(abstract_with_shardings(self.base_abstract, self.base_shardings))
        finally:
            ckpt.close()

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global numpy batch -> global jax arrays; each process contributes its own rows."""
        local = process_slice({k: batch[k] for k in PACKED_KEYS}, jax.process_index(), jax.process_count())
        global_rows = batch["inputs"].shape[0]
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (global_rows,) + v.shape[1:])
                for k, v in local.items()}

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]):
        with self._context():
            return self._train_step(state, self.shard_batch(batch), self.frozen)

    def evaluate(self, params, eval_sets: dict[str, dict[str, np.ndarray]], max_batches: int) -> dict[str, float]:
        """Mean loss over real tokens per domain (``eval/loss/<domain>``) and their mean (``eval/loss``)."""
        out = {}
        with self._context():
            for name, arrays in eval_sets.items():
                tot, n = 0.0, 0.0
                for i, batch in enumerate(eval_batches(arrays, self.cfg.data.batch_size)):
                    if i >= max_batches:
                        break
                    s, c = self._eval_step(params, self.shard_batch(batch))
                    tot, n = tot + float(s), n + float(c)
                out[f"eval/loss/{name}"] = tot / max(n, 1.0)
        if out:
            out["eval/loss"] = float(np.mean(list(out.values())))
            out["eval/perplexity"] = float(np.exp(min(out["eval/loss"], 50.0)))
        return out

    def restore(self, ckpt: Checkpointer, step: int | None = None):
        check_same_model(ckpt.read_config(step), self.cfg.to_dict()["model"], ckpt.directory)
        return ckpt.restore(self.abstract_state, step)


def setup_distributed(cfg: ExperimentConfig) -> None:
    """``jax.distributed.initialize`` from the config (``distributed.*``), else from the environment
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), else JAX's own
    auto-detection (SLURM, Open MPI, Cloud TPU) when ``distributed.enabled=true``. Must run
    before any other JAX call."""
    d = cfg.distributed
    env = os.environ
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = d.num_processes if d.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else _env_int("JAX_PROCESS_ID")
    enabled = bool(address) if d.enabled == "auto" else d.enabled
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer (got {raw!r})") from None


def _check_disk_space(path: Path, needed: int) -> None:
    """A checkpoint needs about the train state's bytes; refuse to start when the disk holding
    ``path`` has less than two of them free (one being written while the last one is kept)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 2 * needed:
        raise ConfigError(f"checkpoint.dir: '{path}' has {free / 2**20:.1f} MiB free, a checkpoint needs about "
                          f"{needed / 2**20:.1f} MiB (two must fit)")


def _check_writable(path: Path, key: str) -> None:
    """Fail before training if ``path`` cannot be created or written (one line, exit 2)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: '{path}' is not writable ('{probe}' does not accept new files)")


def _resume(trainer: Trainer, ckpt: Checkpointer, log) -> tuple[Any, dict, int]:
    """Restore the newest usable checkpoint. A damaged one (unreadable, failing its checksums, or
    holding non-finite parameters) is moved aside as ``<step>.unreadable`` (``log`` tells each move
    at once) and the previous one is tried. A checkpoint that is intact but does not fit this run
    (another model, method or train-state structure, e.g. another optimizer) is refused with one line
    naming the differing settings, and nothing is moved."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    here = trainer.cfg.to_dict()
    moved = []

    def set_aside(step: int, why: str) -> None:
        dst = ckpt.quarantine(step)
        moved.append(dst.name)
        log(f"checkpoint step {step} in {ckpt.directory} is damaged ({why}); moved to {dst.name}, "
            "trying an older one")

    for step in steps:
        try:
            saved = ckpt.read_config(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a damaged checkpoint
            set_aside(step, f"its config is unreadable: {first_line(e)}")
            continue
        damage = ckpt.verify(step)
        if damage:
            set_aside(step, damage)
            continue
        check_same_model(saved, here["model"], ckpt.directory)
        if saved.get("method", "lm") != trainer.cfg.method:
            raise CheckpointError(f"checkpoint '{ckpt.directory}' step {step} was written by method "
                                  f"'{saved.get('method')}', not '{trainer.cfg.method}'")
        try:
            state, data_state = ckpt.restore(trainer.abstract_state, step, verify=False)
        except Exception as e:  # noqa: BLE001
            if ckpt.has_checksums(step) or _readable(ckpt, step):
                raise CheckpointError(
                    f"checkpoint '{ckpt.directory}' step {step} does not fit this run's train state "
                    f"({_differing_settings(saved, here)}); resume with the checkpoint's settings, or start "
                    "another run from its parameters with train.init_from") from None
            set_aside(step, first_line(e))
            continue
        bad = _nonfinite_leaf(state.params)
        if bad:
            set_aside(step, f"parameter {bad} is not finite")
            continue
        # a run halted by the non-finite guard resumes as a new attempt (e.g. with a lower lr)
        state = state.replace(halted_at=jnp.full_like(state.halted_at, -1), bad_streak=jnp.zeros_like(state.bad_streak))
        return state, data_state, step
    raise CheckpointError(f"checkpoint '{ckpt.directory}': no usable checkpoint among steps {steps} "
                          f"(moved aside: {', '.join(moved)})")


def _readable(ckpt: Checkpointer, step: int) -> bool:
    """Whether a step without checksums (saved before they existed) reads with its own structure."""
    try:
        ckpt.restore_raw(step)
        return True
    except Exception:  # noqa: BLE001
        return False


# settings that never change the train state's structure (left out of a mismatch message)
_NOT_STATE = ("name", "resume", "train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
              "train.peak_flops", "train.init_from", "logging.", "checkpoint.", "distributed.", "mesh.", "data.")


def _differing_settings(saved: dict, here: dict, limit: int = 4) -> str:
    from jaxeff.train.logging import flatten

    a, b = flatten(saved), flatten(here)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in _NOT_STATE)]
    if not keys:
        return "the saved config matches this one; the checkpoint was written by another version of jaxeff?"
    shown = ", ".join(f"{k} is {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here" for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"settings that differ: {shown}{more}"


@jax.jit
def _finite_leaves(tree):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.array(True), tree)


def _nonfinite_leaf(params) -> str | None:
    """The '/'-path of the first parameter holding a NaN/Inf, or None."""
    flags = jax.device_get(_finite_leaves(params))
    for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
        if not bool(ok):
            return jax.tree_util.keystr(path, simple=True, separator="/")
    return None


def reference_losses(cfg: ExperimentConfig, domains: list[str], eval_sets: dict, *, devices=None
                     ) -> dict[str, float] | None:
    """The per-domain reference losses of dynamic batch loading (``data.dynamic``), or None when it is
    off: the configured ones (exactly the run's domains), or those of the model of
    ``data.dynamic.reference_run`` evaluated on this run's eval sets (``train.eval_batches`` batches per
    domain). Every domain needs eval data."""
    d = cfg.data.dynamic
    if not d.enabled:
        return None
    no_eval = [n for n in domains if n not in eval_sets]
    if no_eval:
        raise ConfigError(f"data.dynamic.enabled: domain(s) {', '.join(map(repr, no_eval))} have no eval data "
                          "(the weight update needs a per-domain eval loss)")
    if d.reference_losses is not None:
        dyn.check_reference_domains(d.reference_losses, domains, "data.dynamic.reference_losses")
        return {n: float(d.reference_losses[n]) for n in domains}
    from jaxeff.train.checkpoint import find_checkpoint_dir

    field = "data.dynamic.reference_run"
    try:
        ckpt = Checkpointer(find_checkpoint_dir(d.reference_run), create=False)
    except CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None
    try:
        if ckpt.latest_step() is None:
            raise ConfigError(f"{field}: '{d.reference_run}' holds no checkpoint")
        saved = ckpt.read_config()
    finally:
        ckpt.close()
    if saved.get("method", "lm") != "lm":
        raise ConfigError(f"{field}: '{d.reference_run}' was trained with method '{saved.get('method')}'; "
                          "the reference must be an 'lm' run (plain model parameters, e.g. jaxeff extract's)")
    raw = cfg.to_dict()
    raw.update(model=saved["model"], method="lm")
    raw["train"]["init_from"] = None
    ref_cfg = type(cfg).model_validate(raw)
    if ref_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"{field}: the reference model has model.vocab_size={ref_cfg.model.vocab_size}, "
                          f"this run {cfg.model.vocab_size} (it must read the same tokens)")
    ref = Trainer(ref_cfg, devices=devices)
    ev = ref.evaluate(ref.load_base_params(d.reference_run), {n: eval_sets[n] for n in domains},
                      cfg.train.eval_batches)
    return {n: ev[f"eval/loss/{n}"] for n in domains}


def _update_mixture(loader, ev: dict[str, float], reference: dict[str, float], d) -> dict[str, float]:
    """Dynamic batch loading step: new loader weights from the eval losses ``ev`` (``eval/loss/<domain>``);
    returns the scalars to log (``data/weight/<domain>``, ``data/delta/<domain>``)."""
    losses = {n: ev[f"eval/loss/{n}"] for n in loader.domain_names}
    new = dyn.update_weights(loader.weights, losses, reference, clamp=d.clamp, smoothing=d.smoothing)
    loader.set_weights(new)
    delta = dyn.deltas(losses, reference, clamp=d.clamp)
    return {**{f"data/weight/{n}": w for n, w in loader.weights.items()},
            **{f"data/delta/{n}": v for n, v in delta.items()}}




def _warn(text: str) -> None:
    """A note the user must see even if the run then stops (e.g. a checkpoint moved aside)."""
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _all_see_dir(path: Path) -> bool:
    """Whether ``path`` is a folder, agreed by all processes (any that does not see it: no)."""
    seen = path.is_dir()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        seen = bool(np.min(multihost_utils.process_allgather(np.array(seen, np.int32))))
    return seen


def run_training(cfg: ExperimentConfig, *, devices=None) -> dict[str, Any]:
    """Train as the config says; returns the last logged metrics, with ``stopped_early`` (Ctrl-C /
    SIGTERM) or ``halted`` (non-finite guard) when training ended before ``train.steps``."""
    from jaxeff.train.inputs import build_data
    from jaxeff.train.logging import RunLogger

    # Everything that can reject the user's input happens before anything is written.
    trainer = Trainer(cfg, devices=devices)
    if trainer.n_trainable == 0:
        raise ConfigError(f"method: '{cfg.method}' trains no parameters (use it with jaxeff eval / generate)")
    tokenizer, loader, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    reference = reference_losses(cfg, loader.domain_names, eval_sets, devices=devices)
    update_every = cfg.data.dynamic.every or cfg.train.eval_every
    ckpt_dir = cfg.checkpoint_path
    _check_writable(cfg.run_path, "logging.run_dir")
    _check_writable(ckpt_dir, "checkpoint.dir")
    _check_disk_space(ckpt_dir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state)))
    # Look at the checkpoints folder without creating it, so a refused run (e.g. a bad
    # train.init_from) leaves nothing behind; the folder is created once the run's start is settled.
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, create=False) if _all_see_dir(ckpt_dir) else None
    state, start = None, 0
    try:
        existing = ckpt.latest_step() if ckpt else None
        if existing is not None and not cfg.resume:
            raise ConfigError(f"resume: checkpoint directory '{ckpt_dir}' already holds step {existing}; "
                              "pass resume=true to continue it, or choose another name / checkpoint.dir")
        damaged = ckpt.quarantined() if ckpt else []
        if cfg.resume and existing is None and damaged and not cfg.checkpoint.restart_if_damaged:
            raise CheckpointError(f"resume: '{ckpt_dir}' holds no usable checkpoint, only damaged ones set aside "
                                  f"({', '.join(damaged)}); inspect them, or pass "
                                  "checkpoint.restart_if_damaged=true to start again from step 0")
        if cfg.resume and existing is not None:
            state, data_state, _ = _resume(trainer, ckpt, _warn)
            loader.load_state_dict(data_state)
            start = int(state.step)
        if state is None:
            base = trainer.load_base_params(cfg.train.init_from) if cfg.train.init_from else None
            state = trainer.init_state(base)
        if ckpt is None:  # one manager, created by every process alike (orbax synchronises its set-up)
            ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    config_dict = cfg.to_dict()
    logger = RunLogger(cfg.run_path, config_dict, total_steps=cfg.train.steps, start_step=start,
                       progress=cfg.logging.progress)
    if start:
        logger.message(f"resumed from {ckpt_dir} at step {start}")
    logger.message(f"{trainer.n_params:,} parameters ({trainer.n_trainable:,} trainable); mesh {dict(trainer.mesh.shape)}; "
                   f"run dir {cfg.run_path}")
    param_stats = {"params/total": trainer.n_params, "params/trainable": trainer.n_trainable,
                   "params/trainable_pct": trainer.trainable_pct, "params/opt_state_bytes": trainer.opt_state_bytes}
    logger.scalars(start, param_stats)
    if reference is not None:
        logger.scalars(start, {**{f"data/reference_loss/{n}": v for n, v in reference.items()},
                               **{f"data/weight/{n}": w for n, w in loader.weights.items()}})
        logger.message("dynamic batch loading: reference losses " +
                       ", ".join(f"{n} {v:.4f}" for n, v in reference.items()) + f"; weights updated every "
                       f"{update_every} steps")

    peak = peak_flops_per_device(cfg)
    flops_tok = cfg.model.flops_per_token(cfg.data.seq_len)
    last: dict[str, Any] = dict(param_stats)
    tokens_since, t_last, steps_since = 0.0, time.perf_counter(), 0
    step = start
    # loader positions since the last host check, so a halted state is saved with its own position
    data_states = {step: loader.state_dict()}
    if start == 0:  # the untrained baseline, so curves show how far training moved
        logger.scalars(0, trainer.evaluate(state.params, eval_sets, cfg.train.eval_batches))

    def save(at: int, st, data_state: dict) -> str | None:
        """Checkpoint ``st`` as step ``at`` and flush TensorBoard (so the points up to a checkpoint
        survive a kill -9; a resumed run re-logs the later ones), unless a parameter is not finite:
        then nothing is saved and its name is returned."""
        bad = _nonfinite_leaf(st.params)
        if bad is None:
            ckpt.save(at, st, data_state=data_state, config=config_dict)
            logger.flush()
        return bad

    def refuse_nonfinite(at: int, bad: str) -> None:
        last["halted"] = (f"training halted at step {at}: parameter {bad} is not finite "
                          f"(train.nonfinite={cfg.train.nonfinite}); not checkpointed, the newest checkpoint "
                          f"is step {ckpt.latest_step()}")
        logger.message(last["halted"])

    stop = _StopRequest()
    try:
        while step < cfg.train.steps and not stop.agreed(sync_point=step % cfg.train.log_every == 0):
            batch = loader.next_batch()
            state, metrics = trainer.train_step(state, batch)
            step += 1
            steps_since += 1
            tokens_since += float(batch["loss_mask"].sum())
            data_states[step] = loader.state_dict()
            log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
            eval_now = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            save_now = step % cfg.checkpoint.every == 0 or step == cfg.train.steps
            update_now = reference is not None and step % update_every == 0
            if not (log_now or eval_now or save_now or update_now):
                continue
            halted_at = int(state.halted_at)  # host check only on steps that sync anyway
            if halted_at >= 0:
                good = int(state.step)  # the state froze at the halt: it is the one of step `good`
                bad = save(good, state, data_states[good]) if good not in ckpt.all_steps() else None
                if bad:  # cannot happen while the guard keeps the last good state; never saved if it does
                    refuse_nonfinite(good, bad)
                    step = good
                    break
                reason = ("a non-finite loss, gradient norm or update" if cfg.train.nonfinite == "stop" else
                          f"{cfg.train.max_skips} consecutive non-finite losses, gradient norms or updates")
                last["halted"] = (f"training halted at step {halted_at}: {reason}; the last good state "
                                  f"(step {good}) is checkpointed in {ckpt_dir}")
                logger.message(last["halted"])
                step = good
                break
            data_states = {step: data_states[step]}
            if log_now:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t_last
                rows = steps_since * cfg.data.batch_size * cfg.data.seq_len
                logs = {"train/loss": m.pop("loss"), "train/grad_norm": m.pop("grad_norm"),
                        "train/lr": float(trainer.schedule(step - 1)), "perf/step_time_s": dt / steps_since,
                        "perf/tokens_per_sec": rows / dt, "perf/loss_tokens_per_sec": tokens_since / dt,
                        "train/skipped_updates": float(state.skipped)}
                logs["train/perplexity"] = float(np.exp(min(logs["train/loss"], 50.0)))
                if peak:
                    logs["perf/mfu"] = flops_tok * rows / dt / (peak * jax.device_count())
                logs.update({f"train/{k}": v for k, v in m.items()})
                logger.scalars(step, logs)
                logger.advance(steps_since, {"loss": logs["train/loss"]})
                last.update(logs)
                tokens_since, steps_since, t_last = 0.0, 0, time.perf_counter()
            if eval_now or update_now:  # an update between evaluations evaluates (and logs it) too
                ev = trainer.evaluate(state.params, eval_sets, cfg.train.eval_batches)
                logger.scalars(step, ev)
                last.update(ev)
                if update_now:
                    mix = _update_mixture(loader, ev, reference, cfg.data.dynamic)
                    logger.scalars(step, mix)
                    last.update(mix)
                    data_states[step] = loader.state_dict()  # a halt saves step's state with its weights
                t_last = time.perf_counter()
            if save_now:
                bad = save(step, state, loader.state_dict())
                if bad:
                    refuse_nonfinite(step, bad)
                    break
                t_last = time.perf_counter()
        streak = int(state.bad_streak) if "halted" not in last and not stop.stopping else 0
        if streak:  # the last updates were dropped: the run did not finish well, whatever train.max_skips says
            last["halted"] = (f"training ended with {streak} consecutive non-finite losses, gradient norms or "
                              f"updates (fewer than train.max_skips={cfg.train.max_skips}); the final checkpoint "
                              f"(step {step}) holds the last good parameters")
            logger.message(last["halted"])
        if stop.stopping and "halted" not in last:
            bad = save(step, state, loader.state_dict()) if ckpt.latest_step() != step else None
            if bad:
                refuse_nonfinite(step, bad)
            else:
                logger.advance(steps_since)
                logger.message(f"interrupted: checkpoint at step {step} in {ckpt_dir}; resume with resume=true")
                last["stopped_early"] = True
    finally:
        stop.restore()
        logger.close()
        with contextlib.suppress(Exception):  # after a failed save: the save's own error is the one to tell
            ckpt.close()
    last["step"] = step
    return last


class _StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, checkpoint, and stop. (A step
    interrupted half-way would leave the donated train state deleted.) A second Ctrl-C stops at
    once. Processes of a multi-process run agree on the step to stop at."""

    def __init__(self):
        self.requested = False  # this process got the signal
        self.stopping = False  # all processes agreed to stop
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, sync_point: bool) -> bool:
        """Whether to stop now. With several processes they must stop at the same step, so the
        flags are combined across processes, only at ``sync_point`` steps (log steps, which sync
        with the host anyway); a single process stops at the next step boundary."""
        if jax.process_count() == 1:
            self.stopping = self.requested
        elif sync_point:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
            self.stopping = bool(np.max(flags))
        if self.stopping and signal.SIGTERM in self._previous:
            # already stopping: a scheduler's further SIGTERMs (to this or every process) change nothing
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return self.stopping

    def restore(self):
        """Put back the previous handlers; after a stop SIGTERM stays ignored while the process
        shuts down (the run is already checkpointed)."""
        for sig, handler in self._previous.items():
            if not (self.stopping and sig == signal.SIGTERM):
                signal.signal(sig, handler)


def load_params(cfg: ExperimentConfig, checkpoint_dir, step: int | None = None, devices=None):
    """Parameters of a checkpoint, placed with the run's shardings (for eval / generate)."""
    trainer = Trainer(cfg, devices=devices)
    ckpt = Checkpointer(checkpoint_dir, create=False)
    try:
        state, _ = trainer.restore(ckpt, step)
    finally:
        ckpt.close()
    return trainer, state.params


__all__ = ["Trainer", "run_training", "load_params", "setup_distributed"]
