"""The teacher of a distillation: a run's model parameters and architecture as host arrays.

Read by the ``distill`` method (online), by ``jaxeff distill-topk`` (offline top-k logits) and by
sequence-level distillation; kept apart from :mod:`jaxeff.distill.method` so that the offline path
and the method do not import each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir

KEY = "distill.teacher_checkpoint"


@dataclasses.dataclass
class Teacher:
    config: TransformerConfig  # as run here (dtype / runtime settings applied)
    params: Any  # numpy tree, float32 as saved


def load_teacher(path: str | None, step: int | None, student: TransformerConfig, seq_len: int, *, dtype: str = "float32") -> Teacher:
    """Parameters and architecture of a teacher run's checkpoint, as host (numpy) arrays.

    Accepts a checkpoint written by any method whose ``params`` are the model's, or by ``distill``
    (then the student it trained is the teacher). Raises ConfigError / CheckpointError with one line.
    """
    if not path:
        raise ConfigError(f"{KEY}: expected the teacher's run folder (e.g. runs/teacher) or its checkpoints folder")
    try:
        ckpt = Checkpointer(find_checkpoint_dir(path), create=False)
    except CheckpointError as e:
        raise CheckpointError(f"{KEY}: {e}") from None
    try:
        saved = ckpt.read_config(step)
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
        abstract = jax.eval_shape(lambda: init_params(Transformer(cfg), jax.random.PRNGKey(0), (1, 8)))
        nested = saved.get("method") == "distill"
        target = {"model": abstract} if nested else abstract
        try:
            params = ckpt.restore_params(target, step)  # no shardings given: numpy arrays
        except CheckpointError as e:
            raise CheckpointError(f"{KEY}: {e}") from None
    finally:
        ckpt.close()
    params = params["model"] if nested else params
    run_cfg = dataclasses.replace(cfg, dropout=0.0, remat=student.remat, attention_impl=student.attention_impl, dtype=dtype, param_dtype=dtype)
    return Teacher(run_cfg, jax.tree.map(np.asarray, params))
