"""A run's checkpoints folder at start-up: checks before anything is written, and resuming.

``open_checkpoints`` settles how a run starts — refused (checkpoints exist without ``resume=true``,
or only damaged ones are left), resumed from the newest usable checkpoint, or fresh (from
``train.init_from`` or a random initialisation) — and only then creates the folder, so a refused
run leaves nothing behind. A damaged checkpoint (unreadable, failing its checksums, or holding
non-finite parameters) is moved aside as ``<step>.unreadable`` and told at once on stderr; one that
is intact but does not fit the run is refused in one line and left where it is.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.train.checkpoint import Checkpointer, check_same_model, first_line


def open_checkpoints(trainer, loader) -> tuple[Checkpointer, Any, int]:
    """``(checkpointer, train state, start step)`` for ``trainer``'s run; ``loader`` gets the
    resumed data position. Raises (one line) before creating anything when the run cannot start."""
    cfg = trainer.cfg
    ckpt_dir = cfg.checkpoint_path
    check_writable(cfg.run_path, "logging.run_dir")
    check_writable(ckpt_dir, "checkpoint.dir")
    check_disk_space(ckpt_dir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state)))
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, create=False) if _all_see_dir(ckpt_dir) else None
    state, start = None, 0
    try:
        existing = ckpt.latest_step() if ckpt else None
        if existing is not None and not cfg.resume:
            raise ConfigError(
                f"resume: checkpoint directory '{ckpt_dir}' already holds step {existing}; "
                "pass resume=true to continue it, or choose another name / checkpoint.dir"
            )
        damaged = ckpt.quarantined() if ckpt else []
        if cfg.resume and existing is None and damaged and not cfg.checkpoint.restart_if_damaged:
            raise CheckpointError(
                f"resume: '{ckpt_dir}' holds no usable checkpoint, only damaged ones set aside "
                f"({', '.join(damaged)}); inspect them, or pass "
                "checkpoint.restart_if_damaged=true to start again from step 0"
            )
        if cfg.resume and existing is not None:
            state, data_state, _ = resume(trainer, ckpt, warn)
            loader.load_state_dict(data_state)
            start = int(state.step)
        if state is None:
            # the base the method's factory may have read already (QLoRA's): read once, used by both
            base = trainer.base_params() if cfg.train.init_from or trainer.context.has_base else None
            state = trainer.init_state(base)
        trainer.context.release_base()  # the state holds what it needs: free the base's arrays
        if ckpt is None:  # one manager, created by every process alike (orbax synchronises its set-up)
            ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    return ckpt, state, start


def check_disk_space(path: Path, needed: int) -> None:
    """A checkpoint needs about the train state's bytes; refuse to start when the disk holding
    ``path`` has less than two of them free (one being written while the last one is kept)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 2 * needed:
        raise ConfigError(f"checkpoint.dir: '{path}' has {free / 2**20:.1f} MiB free, a checkpoint needs about {needed / 2**20:.1f} MiB (two must fit)")


def check_writable(path: Path, key: str) -> None:
    """Fail before training if ``path`` cannot be created or written (one line, exit 2)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: '{path}' is not writable ('{probe}' does not accept new files)")


def resume(trainer, ckpt: Checkpointer, log) -> tuple[Any, dict, int]:
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
        log(f"checkpoint step {step} in {ckpt.directory} is damaged ({why}); moved to {dst.name}, trying an older one")

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
            raise CheckpointError(f"checkpoint '{ckpt.directory}' step {step} was written by method '{saved.get('method')}', not '{trainer.cfg.method}'")
        try:
            state, data_state = ckpt.restore(trainer.abstract_state, step, verify=False)
        except Exception as e:  # noqa: BLE001
            if ckpt.has_checksums(step) or _readable(ckpt, step):
                made_by = (saved.get("provenance") or {}).get("command")
                if made_by:  # jaxeff.runs.save_model_run: parameters only
                    raise CheckpointError(
                        f"checkpoint '{ckpt.directory}' step {step} holds parameters only (written by {made_by}), "
                        f"no optimizer state to resume; start a new run from it with "
                        f"train.init_from={ckpt.directory.parent}"
                    ) from None
                raise CheckpointError(
                    f"checkpoint '{ckpt.directory}' step {step} does not fit this run's train state "
                    f"({_differing_settings(saved, here)}); resume with the checkpoint's settings, or start "
                    "another run from its parameters with train.init_from"
                ) from None
            set_aside(step, first_line(e))
            continue
        bad = nonfinite_leaf(state.params)
        if bad:
            set_aside(step, f"parameter {bad} is not finite")
            continue
        # a run halted by the non-finite guard resumes as a new attempt (e.g. with a lower lr)
        state = state.replace(halted_at=jnp.full_like(state.halted_at, -1), bad_streak=jnp.zeros_like(state.bad_streak))
        return state, data_state, step
    raise CheckpointError(f"checkpoint '{ckpt.directory}': no usable checkpoint among steps {steps} (moved aside: {', '.join(moved)})")


def _readable(ckpt: Checkpointer, step: int) -> bool:
    """Whether a step without checksums (saved before they existed) reads with its own structure."""
    try:
        ckpt.restore_raw(step)
        return True
    except Exception:  # noqa: BLE001
        return False


# settings that never change the train state's structure (left out of a mismatch message)
_NOT_STATE = (
    "name",
    "resume",
    "train.steps",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.peak_flops",
    "train.init_from",
    "logging.",
    "checkpoint.",
    "distributed.",
    "mesh.",
    "data.",
)


def _differing_settings(saved: dict, here: dict, limit: int = 4) -> str:
    from jaxeff.config import from_dict
    from jaxeff.train.logging import flatten

    try:  # the saved config with the defaults of sections and keys added since it was written
        saved = from_dict(saved).to_dict()
    except Exception:  # noqa: BLE001 - then compare it as written
        pass
    a, b = flatten(saved), flatten(here)
    keys = [
        k
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>") and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in _NOT_STATE)
    ]
    if not keys:
        return "the saved config matches this one; the checkpoint was written by another version of jaxeff?"
    shown = ", ".join(f"{k} is {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here" for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"settings that differ: {shown}{more}"


@jax.jit
def _finite_leaves(tree):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True), tree)


def nonfinite_leaf(params) -> str | None:
    """The '/'-path of the first parameter holding a NaN/Inf, or None."""
    flags = jax.device_get(_finite_leaves(params))
    for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
        if not bool(ok):
            return jax.tree_util.keystr(path, simple=True, separator="/")
    return None


def warn(text: str) -> None:
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
