"""Adapter checkpoints: save / load LoRA adapters alone, bound to the base they were trained on.

An adapter folder holds ``adapter.json`` (rank, alpha, scale, targets, the method that trained it,
the base's model config and fingerprint) and ``weights/`` (an orbax checkpoint of the adapter
tree, a few hundred KB for the study's models). The fingerprint is a SHA-256 over the base's model
config (settings that change the parameters) and the bytes of every base parameter, so loading an
adapter onto any other base -- even one with the same architecture -- fails with a clear error.

    base = ...                                   # model parameters the adapter was trained on
    save_adapter("adapters/recall", adapters, adapter_meta(cfg, fingerprint(base, model_cfg)))
    adapters, meta = load_adapter("adapters/recall", base=base, model_cfg=model_cfg)
    merged = merge(base, adapters, meta["scale"])

From the command line: ``jaxeff export-adapter --checkpoint runs/lora --out adapters/lora`` takes
the adapter out of a lora / qlora run; ``jaxeff merge-adapter --base runs/base --adapter
adapters/lora --out runs/merged`` writes a plain run (method lm) with the adapter folded in, which
``jaxeff eval`` / ``generate`` / ``train.init_from`` read like any other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxeff.errors import CheckpointError
from jaxeff.peft.lora import apply_lora, merge
from jaxeff.train.checkpoint import RUNTIME_ONLY, check_same_model, new_lm_run, one_device_config, open_new_run

META_FILE = "adapter.json"
FORMAT = "jaxeff-lora-adapter/1"


def fingerprint(params, model_cfg: dict) -> str:
    """SHA-256 (hex) of the model config (parameter-relevant keys) and every parameter's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in model_cfg.items() if k not in RUNTIME_ONLY}, sort_keys=True).encode())
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{'/'.join(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def adapter_meta(cfg, base_fingerprint: str, base_path: str | None = None) -> dict[str, Any]:
    """The ``adapter.json`` record for adapters trained by a run with config ``cfg``."""
    p = cfg.peft
    return {"format": FORMAT, "method": cfg.method, "rank": p.rank, "alpha": p.alpha, "scale": p.alpha / p.rank,
            "targets": list(p.targets), "base_fingerprint": base_fingerprint,
            "base_path": base_path if base_path is not None else cfg.train.init_from,
            "base_model": cfg.to_dict()["model"], "run": cfg.name}


def save_adapter(directory, adapters, meta: dict[str, Any]) -> Path:
    """Write ``adapters`` (the ``lora`` tree) and ``meta`` into a new folder ``directory``."""
    d = Path(directory).absolute()
    if (d / META_FILE).exists():
        raise CheckpointError(f"adapter folder '{directory}' already holds an adapter; choose another --out")
    d.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), adapters)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / "weights", host)
    (d / META_FILE).write_text(json.dumps(meta, indent=1))
    return d


def read_meta(directory) -> dict[str, Any]:
    f = Path(directory) / META_FILE
    if not f.is_file():
        raise CheckpointError(f"adapter folder '{directory}' has no {META_FILE} (not an adapter saved by jaxeff)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"adapter folder '{directory}': unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_adapter(directory, *, base=None, model_cfg: dict | None = None,
                 expected_fingerprint: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(adapters, meta)`` of an adapter folder. With ``base`` + ``model_cfg`` (or a precomputed
    ``expected_fingerprint``) the adapter must belong to that base, else CheckpointError."""
    meta = read_meta(directory)
    if base is not None:
        if model_cfg is None:
            raise ValueError("load_adapter: pass model_cfg with base")
        check_same_model({"model": meta["base_model"]}, model_cfg, Path(directory))
        expected_fingerprint = fingerprint(base, model_cfg)
    if expected_fingerprint is not None and expected_fingerprint != meta["base_fingerprint"]:
        raise CheckpointError(
            f"adapter '{directory}' was trained on base {meta['base_fingerprint'][:12]} "
            f"({meta.get('base_path') or 'random init'}), not on this base ({expected_fingerprint[:12]}); "
            "load it onto the base it was trained on")
    with ocp.StandardCheckpointer() as ckptr:
        adapters = ckptr.restore(Path(directory).absolute() / "weights")
    return adapters, meta


class AdapterSet:
    """Several adapters on one base, switched per call without touching the base::

        bank = AdapterSet(model, base, cfg.to_dict()["model"])
        bank.load("recall", "adapters/recall"); bank.load("code", "adapters/code")
        bank.apply("recall", tokens).logits; bank.params("code")   # unmerged run / merged params
    """

    def __init__(self, model, base, model_cfg: dict):
        self.model, self.base = model, base
        self.fingerprint = fingerprint(base, model_cfg)
        self.adapters: dict[str, tuple[Any, float]] = {}

    def load(self, name: str, directory) -> None:
        adapters, meta = load_adapter(directory, expected_fingerprint=self.fingerprint)
        self.adapters[name] = (adapters, float(meta["scale"]))

    def add(self, name: str, adapters, scale: float) -> None:
        self.adapters[name] = (adapters, float(scale))

    def _get(self, name):
        if name not in self.adapters:
            raise KeyError(f"no adapter named '{name}' (have {sorted(self.adapters)})")
        return self.adapters[name]

    def apply(self, name: str, tokens, **kwargs):
        adapters, scale = self._get(name)
        return apply_lora(self.model, self.base, adapters, scale, tokens, **kwargs)

    def params(self, name: str):
        adapters, scale = self._get(name)
        return merge(self.base, adapters, scale)


# ------------------------------------------------------------------------------------------------
# from runs (the CLI)


def export_adapter(run, out, step: int | None = None) -> Path:
    """Take the adapters out of a ``lora`` / ``qlora`` run's checkpoint into an adapter folder."""
    from jaxeff.peft.qlora import load_base
    from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings, find_checkpoint_dir
    from jaxeff.train.loop import Trainer

    ckpt = Checkpointer(find_checkpoint_dir(run), create=False)
    try:
        cfg = one_device_config(ckpt.read_config(step))
        if cfg.method not in ("lora", "qlora"):
            raise CheckpointError(f"checkpoint '{ckpt.directory}' is a '{cfg.method}' run; expected a lora or qlora run")
        trainer = Trainer(cfg, devices=jax.devices()[:1])
        params = ckpt.restore_params(abstract_with_shardings(trainer.abstract_state.params, trainer.param_shardings),
                                     step)
    finally:
        ckpt.close()
    base = load_base(cfg, trainer.model)
    return save_adapter(out, params["lora"], adapter_meta(cfg, fingerprint(base, cfg.to_dict()["model"])))


def merge_adapter(base_run, adapter_dir, out_run) -> Path:
    """Fold an adapter into a base run's parameters and save them as a new run (method lm)."""
    from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings, find_checkpoint_dir
    from jaxeff.train.loop import Trainer

    out = Path(out_run)
    read_meta(adapter_dir)  # a bad folder fails before anything is loaded
    ckpt = Checkpointer(find_checkpoint_dir(base_run), create=False)
    try:
        cfg = one_device_config(ckpt.read_config(), **new_lm_run(out))
        trainer = Trainer(cfg, devices=jax.devices()[:1])
        base = ckpt.restore_params(abstract_with_shardings(trainer.base_abstract, trainer.base_shardings))
    finally:
        ckpt.close()
    adapters, meta = load_adapter(adapter_dir, base=base, model_cfg=cfg.to_dict()["model"])
    merged = merge(base, adapters, meta["scale"])
    out_ckpt = open_new_run(cfg, out)
    try:
        state = trainer.init_state(merged)
        out_ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    finally:
        out_ckpt.close()
    return out
