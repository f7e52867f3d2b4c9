"""The training loop: a runtime (``Trainer``), data, and hooks that run every N steps.

``run_training`` builds the runtime (``jaxeff.train.runtime``), the data, and the run's checkpoints
(``jaxeff.train.resume``: refused, resumed or fresh), then steps. After each step the hooks that are
due run in order — log, eval, mixture update (dynamic batch loading), checkpoint, then any the caller
adds — each a plain function of the :class:`Loop` (state, step, logger, ...). Steps where no hook is
due never wait for the device. On steps where one is, the non-finite guard is checked first: a run
it halted saves its last good state and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

from jaxeff.data import dynamic as dyn
from jaxeff.errors import ConfigError
from jaxeff.train.logging import device_peak_memory, log_step_memory, objective_scalars
from jaxeff.train.resume import nonfinite_leaf, open_checkpoints

# the runtime's names, re-exported: most tools import them from here
from jaxeff.train.runtime import PEAK_FLOPS, Trainer, load_params, peak_flops_per_device, setup_distributed

if TYPE_CHECKING:  # the schema is built from the method registry on first use
    from jaxeff.config import ExperimentConfig


@dataclasses.dataclass
class Loop:
    """What the hooks read and change while training runs."""

    cfg: ExperimentConfig
    trainer: Trainer
    loader: Any
    eval_sets: dict
    logger: Any
    ckpt: Any
    state: Any
    step: int
    metrics: Any = None  # the last step's metrics (on device)
    last: dict = dataclasses.field(default_factory=dict)  # the last value of everything logged: the result
    # loader positions since the last host check, so a halted state is saved with its own position
    data_states: dict = dataclasses.field(default_factory=dict)
    evaluated: dict | None = None  # this step's eval results, when a hook evaluated
    halted: str | None = None  # set by a hook (or the guard) to stop: the reason
    t_last: float = dataclasses.field(default_factory=time.perf_counter)  # timing since the last log
    steps_since: int = 0
    tokens_since: float = 0.0

    def reset_clock(self) -> None:
        """Exclude the time a hook took (eval, checkpoint) from the next step-time measurement."""
        self.t_last = time.perf_counter()

    def evaluate(self) -> dict:
        if self.evaluated is None:
            self.evaluated = self.trainer.evaluate(self.state.params, self.eval_sets, self.cfg.train.eval_batches)
            self.logger.scalars(self.step, self.evaluated)
            self.last.update(self.evaluated)
        return self.evaluated

    def save(self, at: int, state, data_state: dict) -> bool:
        """Checkpoint ``state`` as step ``at`` and flush TensorBoard (so the points up to a checkpoint
        survive a kill -9; a resumed run re-logs the later ones) — unless a parameter is not finite:
        then nothing is saved, the run halts, and False is returned."""
        bad = nonfinite_leaf(state.params)
        if bad is not None:
            self.halted = (
                f"training halted at step {at}: parameter {bad} is not finite "
                f"(train.nonfinite={self.cfg.train.nonfinite}); not checkpointed, the newest "
                f"checkpoint is step {self.ckpt.latest_step()}"
            )
            return False
        self.logger.flush()  # first: once step `at` is on disk, so are its points
        self.ckpt.save(at, state, data_state=data_state, config=self.cfg.to_dict())
        return True


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(loop)`` after every ``every``-th step (and after the last step when ``at_end``)."""

    name: str
    every: int
    fn: Callable[[Loop], None]
    at_end: bool = True

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == total)


# ----------------------------------------------------------------------------------------------
# the default hooks


def log_hook(loop: Loop) -> None:
    cfg, trainer, step = loop.cfg, loop.trainer, loop.step
    m = {k: float(v) for k, v in jax.device_get(loop.metrics).items()}
    dt = time.perf_counter() - loop.t_last
    rows = loop.steps_since * cfg.data.batch_size * cfg.data.seq_len
    logs = {
        "train/loss": m.pop("loss"),
        "train/grad_norm": m.pop("grad_norm"),
        "train/lr": float(trainer.schedule(step - 1)),
        "perf/step_time_s": dt / loop.steps_since,
        "perf/tokens_per_sec": rows / dt,
        "perf/loss_tokens_per_sec": loop.tokens_since / dt,
        "train/skipped_updates": float(loop.state.skipped),
    }
    peak = peak_flops_per_device(cfg)
    if peak:
        logs["perf/mfu"] = cfg.model.flops_per_token(cfg.data.seq_len) * rows / dt / (peak * jax.device_count())
    logs.update({f"train/{k}": v for k, v in m.items()})
    logs.update(objective_scalars(logs))  # train/ce always, train/perplexity where the loss is cross-entropy
    logs.update(device_peak_memory())
    loop.logger.scalars(step, logs)
    loop.logger.advance(loop.steps_since, {"loss": logs["train/loss"]})
    loop.last.update(logs)
    loop.tokens_since, loop.steps_since = 0.0, 0
    loop.reset_clock()


def eval_hook(loop: Loop) -> None:
    loop.evaluate()
    loop.reset_clock()


def mixture_hook(reference: dict[str, float]) -> Callable[[Loop], None]:
    """Dynamic batch loading: new domain weights from this step's eval losses (evaluating, and
    logging it, when no evaluation was due)."""

    def fn(loop: Loop) -> None:
        mix = dyn.update_mixture(loop.loader, loop.evaluate(), reference, loop.cfg.data.dynamic)
        loop.logger.scalars(loop.step, mix)
        loop.last.update(mix)
        loop.data_states[loop.step] = loop.loader.state_dict()  # a halt saves step's state with its weights
        loop.reset_clock()

    return fn


def checkpoint_hook(loop: Loop) -> None:
    if loop.save(loop.step, loop.state, loop.loader.state_dict()):
        loop.reset_clock()


def default_hooks(cfg: ExperimentConfig, reference: dict[str, float] | None) -> list[Hook]:
    hooks = [Hook("log", cfg.train.log_every, log_hook), Hook("eval", cfg.train.eval_every, eval_hook)]
    if reference is not None:
        every = cfg.data.dynamic.every or cfg.train.eval_every
        hooks.append(Hook("mixture", every, mixture_hook(reference), at_end=False))
    hooks.append(Hook("checkpoint", cfg.checkpoint.every, checkpoint_hook))
    return hooks


def _check_halt(loop: Loop) -> bool:
    """The non-finite guard's verdict, read on steps that sync anyway: a halted state froze at its
    last good step, which is checkpointed (with its loader position) before stopping."""
    halted_at = int(loop.state.halted_at)
    if halted_at < 0:
        return False
    good = int(loop.state.step)
    cfg = loop.cfg
    if good in loop.ckpt.all_steps() or loop.save(good, loop.state, loop.data_states[good]):
        reason = (
            "a non-finite loss, gradient norm or update"
            if cfg.train.nonfinite == "stop"
            else f"{cfg.train.max_skips} consecutive non-finite losses, gradient norms or updates"
        )
        loop.halted = f"training halted at step {halted_at}: {reason}; the last good state (step {good}) is checkpointed in {cfg.checkpoint_path}"
    loop.step = good
    return True


# ----------------------------------------------------------------------------------------------


def run_training(cfg: ExperimentConfig, *, devices=None, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train as the config says; the method's hooks run after the default ones but before the checkpoint,
    ``hooks`` after all of them. Returns the last logged
    metrics, with ``stopped_early`` (Ctrl-C / SIGTERM) or ``halted`` (non-finite guard) when training
    ended before ``train.steps``."""
    from jaxeff.train.inputs import build_data
    from jaxeff.train.logging import RunLogger

    # Everything that can reject the user's input happens before anything is written.
    trainer = Trainer(cfg, devices=devices)
    if trainer.n_trainable == 0:
        raise ConfigError(f"method: '{cfg.method}' trains no parameters (use it with jaxeff eval / generate)")
    _, loader, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    reference = dyn.reference_losses(cfg, loader.domain_names, eval_sets, devices=devices)
    ckpt, state, start = open_checkpoints(trainer, loader)
    logger = RunLogger(cfg.run_path, cfg.to_dict(), total_steps=cfg.train.steps, start_step=start, progress=cfg.logging.progress)
    loop = Loop(cfg, trainer, loader, eval_sets, logger, ckpt, state, start)
    if start:
        logger.message(f"resumed from {cfg.checkpoint_path} at step {start}")
    logger.message(f"{trainer.n_params:,} parameters ({trainer.n_trainable:,} trainable); mesh {dict(trainer.mesh.shape)}; run dir {cfg.run_path}")
    param_stats = {
        "params/total": trainer.n_params,
        "params/trainable": trainer.n_trainable,
        "params/trainable_pct": trainer.trainable_pct,
        "params/opt_state_bytes": trainer.opt_state_bytes,
    }
    logger.scalars(start, param_stats)
    loop.last.update(param_stats)
    if reference is not None:
        logger.scalars(
            start, {**{f"at_start/reference_loss/{n}": v for n, v in reference.items()}, **{f"data/weight/{n}": w for n, w in loader.weights.items()}}
        )
        logger.message(
            "dynamic batch loading: reference losses " + ", ".join(f"{n} {v:.4f}" for n, v in reference.items()) + f"; weights updated every "
            f"{cfg.data.dynamic.every or cfg.train.eval_every} steps"
        )
    # the method's hooks run before the checkpoint is written: a hook that rewrites the state (a pruning
    # round) is then in the checkpoint of its step, so a resumed run never skips it
    defaults = default_hooks(cfg, reference)
    at = next(i for i, h in enumerate(defaults) if h.name == "checkpoint")
    all_hooks = defaults[:at] + list(trainer.method.hooks) + defaults[at:] + list(hooks)
    loop.data_states = {start: loader.state_dict()}
    if start == 0:  # the untrained baseline, so curves show how far training moved
        logger.scalars(0, trainer.evaluate(state.params, eval_sets, cfg.train.eval_batches))
    loop.reset_clock()
    stop = _StopRequest()
    total = cfg.train.steps
    try:
        while loop.step < total and not stop.agreed(sync_point=loop.step % cfg.train.log_every == 0):
            batch = loader.next_batch()
            if loop.step == start:
                log_step_memory(logger, trainer, loop.state, batch, start)
            loop.state, loop.metrics = trainer.train_step(loop.state, batch)
            loop.step += 1
            loop.steps_since += 1
            loop.tokens_since += float(batch["loss_mask"].sum())
            loop.data_states[loop.step] = loader.state_dict()
            due = [h for h in all_hooks if h.due(loop.step, total)]
            if not due:
                continue
            if _check_halt(loop):  # host check only on steps that sync anyway
                break
            loop.data_states = {loop.step: loop.data_states[loop.step]}
            loop.evaluated = None
            for hook in due:
                hook.fn(loop)
                if loop.halted:
                    break
            if loop.halted:
                break
        streak = int(loop.state.bad_streak) if not loop.halted and not stop.stopping else 0
        if streak:  # the last updates were dropped: the run did not finish well, whatever train.max_skips says
            loop.halted = (
                f"training ended with {streak} consecutive non-finite losses, gradient norms or "
                f"updates (fewer than train.max_skips={cfg.train.max_skips}); the final checkpoint "
                f"(step {loop.step}) holds the last good parameters"
            )
        if stop.stopping and not loop.halted:
            if ckpt.latest_step() == loop.step or loop.save(loop.step, loop.state, loader.state_dict()):
                logger.advance(loop.steps_since)
                logger.message(f"interrupted: checkpoint at step {loop.step} in {cfg.checkpoint_path}; resume with resume=true")
                loop.last["stopped_early"] = True
        if loop.halted:
            logger.message(loop.halted)
            loop.last["halted"] = loop.halted
        logger.finish()
    finally:
        stop.restore()
        logger.close()
        with contextlib.suppress(Exception):  # after a failed save: the save's own error is the one to tell
            ckpt.close()
    loop.last["step"] = loop.step
    return loop.last


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


__all__ = ["run_training", "Loop", "Hook", "default_hooks", "Trainer", "load_params", "setup_distributed", "peak_flops_per_device", "PEAK_FLOPS"]
