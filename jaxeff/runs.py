"""One way to read and write a run folder: its config, its model parameters, a plain model run.

A run folder is ``<run>/checkpoints/<step>/`` (orbax) + ``config.yaml``; the saved config of each
step says which model and method wrote it. Tools that read a run (eval, generate, merge, extract,
sparsify, export, adapters) go through here:

* ``read_config(run, step)``: the saved config (a dict), newest step by default;
* ``abstract_model_params(saved_config)``: the shapes of its model parameters (nothing read);
* ``load_model_params(run, step)``: ``(config, model parameters)`` on one device (or as host arrays),
  for any method (through ``Method.model_params``: LoRA merged, the distilled student, ...);
* ``load_run(run, step)``: ``(config, trainer, prepared parameters)`` on one device: the method's own
  tree, read by a trainer built to load (``purpose="load"``): inputs only training needs are not
  read (a distilled student loads after its teacher's folder is gone);
* ``save_model_run(params, cfg)``: a new run holding parameters only (no optimizer state), refused
  when the folder already holds a checkpoint. ``eval``, ``generate`` and ``train.init_from`` read
  parameters only; resuming such a run is refused (start from it with ``train.init_from``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings, find_checkpoint_dir, new_lm_run, one_device_config


def read_config(run, step: int | None = None) -> dict:
    """The saved config of a run folder (or its checkpoints folder), newest step or ``step``."""
    with Checkpointer(find_checkpoint_dir(run), create=False) as ckpt:
        return ckpt.read_config(step)


def abstract_model_params(saved_config: dict):
    """Shapes and dtypes of a run's model parameters (no weights read, nothing allocated)."""
    return _abstract(json.dumps(saved_config["model"], sort_keys=True))


@functools.lru_cache(maxsize=16)
def _abstract(model_json: str):
    import jax

    from pydantic import TypeAdapter

    from jaxeff.models import Transformer, TransformerConfig, init_params

    model = Transformer(TypeAdapter(TransformerConfig).validate_python(json.loads(model_json)))
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), (1, 8)))


def load_model_params(run, step: int | None = None, *, host: bool = False):
    """``(config, model params)`` of a run on one device; any method (its ``model_params``). The
    config is the run's on one device (mesh 1x1x1, batch 1). ``host``: numpy arrays instead (an
    ``lm`` run's are read straight to host memory, e.g. a teacher sharded afterwards)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    with Checkpointer(find_checkpoint_dir(run), create=False) as ckpt:
        cfg = one_device_config(ckpt.read_config(step), **{"data.batch_size": 1})
        if cfg.method == "lm":  # the saved params are the model's: no trainer needed
            abstract = abstract_model_params(cfg.to_dict())
            if host:  # no shardings given: numpy arrays
                return cfg, ckpt.restore_params(abstract, step)
            one = SingleDeviceSharding(jax.devices()[0])
            return cfg, ckpt.restore_params(abstract_with_shardings(abstract, jax.tree.map(lambda _: one, abstract)), step)
    cfg, trainer, params = load_run(run, step)
    params = trainer.method.model_params(params)
    return cfg, (jax.device_get(params) if host else params)


def load_run(run, step: int | None = None):
    """``(config, trainer, prepared params)`` of a run on one device (batch 1): the method's own tree
    and its trainer, for tools that run it as trained (``trainer.method.run``) or read its other parts
    (Medusa's heads)."""
    import jax

    from jaxeff.train.runtime import load_params

    ckpt_dir = find_checkpoint_dir(run)
    cfg = one_device_config(read_config(ckpt_dir, step), **{"data.batch_size": 1})
    trainer, params = load_params(cfg, ckpt_dir, step, devices=jax.devices()[:1])
    return cfg, trainer, params


def lm_run_config(saved: dict, out, **changes):
    """The config of a new plain ``lm`` run in folder ``out`` made from a saved run's config (its
    model, data and settings), on one device, with dotted ``changes``."""
    return one_device_config(saved, **{**new_lm_run(Path(out)), **changes})


def check_new_run(out, key: str = "--out") -> None:
    """Refuse (one line naming ``key``) an output run folder whose ``checkpoints/`` is not empty;
    called before any weights are read, and again by :func:`save_model_run`."""
    from jaxeff.errors import CheckpointError

    ckpts = Path(out) / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        raise CheckpointError(f"{key}: '{out}' already holds a checkpoint; choose another folder")


def save_model_run(params: Any, cfg, *, provenance: dict | None = None, key: str = "--out", step: int = 0) -> Path:
    """Write ``params`` (an ``lm`` run's model parameters, or the prepared tree of ``cfg.method``)
    as step ``step`` of the run ``cfg`` (``cfg.run_path``), with its ``config.yaml``; parameters
    only, no optimizer state. ``provenance`` (what made it: command, source, method, data) leads
    the saved config and config.yaml. A folder that already holds a checkpoint is refused naming
    ``key``."""
    from jaxeff.config import run_dict, run_yaml
    from jaxeff.errors import CheckpointError

    out = cfg.run_path
    with Checkpointer(cfg.checkpoint_path) as ckpt:
        if ckpt.latest_step() is not None:
            raise CheckpointError(f"{key}: '{out}' already holds a checkpoint; choose another folder")
        ckpt.save(step, {"params": params}, data_state={}, config=run_dict(cfg, provenance))
    (out / "config.yaml").write_text(run_yaml(cfg, provenance))
    return out


__all__ = ["read_config", "abstract_model_params", "load_model_params", "load_run", "lm_run_config", "check_new_run", "save_model_run"]
