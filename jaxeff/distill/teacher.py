"""The teacher of a distillation: a run's model parameters and architecture as host arrays.

Read by the ``distill`` method (online, when it trains) and by ``jaxeff distill-topk`` (offline
top-k logits); kept apart from :mod:`jaxeff.distill.method` so that the offline path
and the method do not import each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import TransformerConfig

KEY = "distill.teacher_checkpoint"


@dataclasses.dataclass
class Teacher:
    config: TransformerConfig  # as run here (dtype / runtime settings applied)
    params: Any  # numpy tree, float32 as saved


def load_teacher(path: str | None, step: int | None, student: TransformerConfig, seq_len: int, *, dtype: str = "float32") -> Teacher:
    """Parameters and architecture of a teacher run's checkpoint, as host (numpy) arrays.

    Any method's run is a teacher: its model parameters are read through
    :func:`jaxeff.runs.load_model_params` (the method's ``model_params``: an ``lm`` run's, a
    distilled student, a LoRA run merged, ...). The vocabulary and length checks come first, from
    the saved config alone. Raises ConfigError / CheckpointError with one line naming the key.
    """
    from jaxeff import runs

    if not path:
        raise ConfigError(f"{KEY}: expected the teacher's run folder (e.g. runs/teacher) or its checkpoints folder")
    try:
        saved = runs.read_config(path, step)
    except CheckpointError as e:
        raise CheckpointError(f"{KEY}: {e}") from None
    try:
        cfg = TransformerConfig(**saved["model"])
    except Exception as e:  # noqa: BLE001 - any malformed saved config is the user's input
        raise CheckpointError(f"{KEY}: '{path}' holds no readable model config ({type(e).__name__})") from None
    if cfg.vocab_size != student.vocab_size:
        raise ConfigError(
            f"{KEY}: the teacher's vocab_size is {cfg.vocab_size} but model.vocab_size is "
            f"{student.vocab_size}; teacher and student must share the vocabulary"
        )
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"{KEY}: data.seq_len={seq_len} is above the teacher's max_seq_len={cfg.max_seq_len}")
    try:
        _, params = runs.load_model_params(path, step, host=True)
    except (CheckpointError, ConfigError) as e:
        raise type(e)(f"{KEY}: {e}") from None
    run_cfg = dataclasses.replace(cfg, dropout=0.0, remat=student.remat, attention_impl=student.attention_impl, dtype=dtype, param_dtype=dtype)
    return Teacher(run_cfg, jax.tree.map(np.asarray, params))
