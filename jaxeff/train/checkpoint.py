"""orbax checkpoints: train state + data-loader position + the resolved config, in one step folder.

orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step that ``latest_step`` would pick up. The saved config lets ``eval`` and
``generate`` rebuild the model from the checkpoint alone and lets a resume refuse a checkpoint of
a different model with a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxeff.errors import CheckpointError

for _name in ("absl", "orbax"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory '{directory}' does not exist")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, *, data_state: dict, config: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({"config": config}))
        self._mngr.save(step, args=args, force=True)
        self._mngr.wait_until_finished()

    def read_config(self, step: int | None = None) -> dict:
        step = self._resolve(step)
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return meta["config"]

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings of ``abstract_state`` (a tree of ShapeDtypeStruct)."""
        step = self._resolve(step)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint '{self.directory}' step {step} does not match this run: {first}") from None
        return out["state"], out["data"]

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the ``params`` of a saved train state (whatever method wrote it)."""
        step = self._resolve(step)
        args = ocp.args.PyTreeRestore(item={"params": abstract_params}, partial_restore=True,
                                      restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)})
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=args))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint '{self.directory}' step {step}: parameters do not match: {first}") from None
        params = out["state"]["params"]
        # partial_restore leaves a parameter the checkpoint lacks as its ShapeDtypeStruct: refuse by name
        # (e.g. a run whose method stores its parameters under another structure, such as ttt_e2e's)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise CheckpointError(f"checkpoint '{self.directory}' step {step}: has no parameter '{name}' "
                                      "(a run of a method that stores its parameters differently?)")
        return params

    def quarantine(self, step: int) -> Path:
        """Move an unreadable step folder aside (``<step>.unreadable``) so a resumed run can write
        that step again; nothing is deleted."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.unreadable{n}"
        if jax.process_index() == 0:
            src.rename(dst)
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxeff:quarantine:{step}")
        self._mngr.reload()
        return dst

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"checkpoint directory '{self.directory}' holds no complete checkpoint")
        elif step not in self.all_steps():
            raise CheckpointError(f"checkpoint directory '{self.directory}' has no step {step} (has {self.all_steps()})")
        return step

    def close(self):
        self._mngr.close()


def with_changes(saved: dict, **changes) -> dict:
    """A deep copy of a saved config dict with dotted ``changes`` (``{"data.batch_size": 1}``) set."""
    saved = json.loads(json.dumps(saved))
    for dotted, value in changes.items():
        node = saved
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return saved


ONE_DEVICE = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "optim.grad_accum": 1}


def one_device_config(saved: dict, **changes):
    """The :class:`~jaxeff.config.ExperimentConfig` of a saved run set up for one device (mesh
    1x1x1, no gradient accumulation), with dotted ``changes``: how tools that read a run (eval,
    generate, extract, merge, convert, ...) rebuild it."""
    from jaxeff.config import from_dict

    return from_dict(with_changes(saved, **{**ONE_DEVICE, **changes}))


def new_lm_run(out: Path) -> dict:
    """Dotted changes that make a saved run's config that of a fresh plain ``lm`` run in folder
    ``out`` (for tools that write a new run: merge, extract, sparsify, ...)."""
    return {"name": out.name, "logging.run_dir": str(out.parent), "checkpoint.dir": None, "method": "lm",
            "train.init_from": None, "resume": False}


def open_new_run(cfg, out: Path, key: str = "--out") -> "Checkpointer":
    """The checkpointer of the new run ``cfg`` (in folder ``out``), refused with one line naming
    ``key`` when that folder already holds a checkpoint. The caller closes it."""
    ckpt = Checkpointer(cfg.checkpoint_path)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise CheckpointError(f"{key}: '{out}' already holds a checkpoint; choose another folder")
    return ckpt


def read_run_config(run, step: int | None = None) -> dict:
    """The saved config of a run folder (or its checkpoints folder), newest step or ``step``."""
    ckpt = Checkpointer(find_checkpoint_dir(run), create=False)
    try:
        return ckpt.read_config(step)
    finally:
        ckpt.close()


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run folder (``runs/<name>``) or its ``checkpoints`` folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint directory '{path}' does not exist")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    return p


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted path of the first differing entry between two JSON-like trees (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return sub
            d = first_difference(a[key], b[key], sub)
            if d:
                return d
        return None
    norm = lambda v: json.loads(json.dumps(v))  # tuples vs lists
    return None if norm(a) == norm(b) else prefix or "<root>"


# settings that change how a model runs, not which parameters it has
RUNTIME_ONLY = ("attention_impl", "remat", "dropout", "dtype")


def _with_defaults(model: dict) -> dict:
    """A saved model section with the defaults of fields added since it was written."""
    from pydantic import TypeAdapter, ValidationError

    from jaxeff.models.config import TransformerConfig

    try:
        adapter = TypeAdapter(TransformerConfig)
        return adapter.dump_python(adapter.validate_python(model), mode="json")
    except ValidationError:
        return model


def check_same_model(saved_config: dict, model_config: dict, where: Path) -> None:
    saved = {k: v for k, v in _with_defaults(saved_config.get("model", {})).items() if k not in RUNTIME_ONLY}
    diff = first_difference(saved, {k: v for k, v in model_config.items() if k not in RUNTIME_ONLY})
    if diff:
        def get(tree, dotted):
            for k in dotted.split("."):
                tree = tree.get(k, "<absent>") if isinstance(tree, dict) else "<absent>"
            return tree
        raise CheckpointError(
            f"checkpoint '{where}' is from a different model: model.{diff} is "
            f"{get(saved_config.get('model', {}), diff)!r} there but {get(model_config, diff)!r} here"
        )


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
