"""Adapter folders: save / load LoRA adapters alone, bound to the base they were trained on.

An adapter folder is a Hugging Face PEFT LoRA folder -- ``adapter_config.json`` and
``adapter_model.safetensors`` (:mod:`jaxeff.peft.hf_adapter`), which ``PeftModel.from_pretrained``
loads onto the base converted with ``jaxeff convert --to-hf`` -- plus jaxeff's ``adapter.json``
(format ``jaxeff-lora-adapter/2``: the method that trained it, rank, alpha, scale, targets, the
base's model config and fingerprint). The fingerprint is a SHA-256 over the base's model config
(settings that change the parameters) and the bytes of every base parameter, so loading an
adapter onto any other base -- even one with the same architecture -- fails with a clear error.
PEFT folders made elsewhere (no ``adapter.json``) load too, checked by tensor names and shapes;
folders of the earlier format (``jaxeff-lora-adapter/1``: ``adapter.json`` + an orbax ``weights/``
folder) still load.

    base = ...                                   # model parameters the adapter was trained on
    save_adapter("adapters/recall", adapters, adapter_meta(cfg, fingerprint(base, model_cfg)))
    adapters, meta = load_adapter("adapters/recall", base=base, model_cfg=model_cfg)
    merged = merge(base, adapters, meta["scale"])

From the command line: ``jaxeff export-adapter --checkpoint runs/lora --out runs/adapters/lora``
takes the adapter out of a lora / qlora run; ``jaxeff merge-adapter --base runs/base --adapter
runs/adapters/lora --out runs/merged`` (any PEFT LoRA folder) writes a plain run (method lm) with
the adapter folded in, which ``jaxeff eval`` / ``generate`` / ``train.init_from`` read like any
other; ``peft.init_adapter=DIR`` starts a lora / qlora run from one.
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
from jaxeff.peft import hf_adapter
from jaxeff.peft.lora import apply_lora, merge
from jaxeff.train.checkpoint import RUNTIME_ONLY, check_same_model, new_lm_run, one_device_config, open_new_run

META_FILE = "adapter.json"
FORMAT = "jaxeff-lora-adapter/2"  # weights in PEFT's adapter_model.safetensors
FORMAT_ORBAX = "jaxeff-lora-adapter/1"  # weights in an orbax folder weights/ (read only)


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
    return {
        "format": FORMAT,
        "method": cfg.method,
        "rank": p.rank,
        "alpha": p.alpha,
        "scale": p.alpha / p.rank,
        "dropout": p.dropout,
        "targets": list(p.targets),
        "base_fingerprint": base_fingerprint,
        "base_path": base_path if base_path is not None else cfg.train.init_from,
        "base_model": cfg.to_dict()["model"],
        "run": cfg.name,
    }


def base_model_name(base_path: str | None) -> str | None:
    """``base_model_name_or_path`` for PEFT: the folder of an ``hf:DIR`` base; None for a jaxeff
    run (not a Hugging Face model: PEFT would look for its config.json there, or on the Hub)."""
    if base_path and str(base_path).startswith("hf:"):
        return str(base_path)[3:]
    return None


def save_adapter(directory, adapters, meta: dict[str, Any], *, like=None, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapters`` (the ``lora`` tree) as a PEFT LoRA folder plus ``meta`` (``adapter.json``)
    into a new folder ``directory``. ``like``: the base's parameters (short ``target_modules``
    names where every layer is adapted); ``base_model_name_or_path`` defaults to ``meta``'s base."""
    d = Path(directory).absolute()
    for f in (META_FILE, hf_adapter.CONFIG, hf_adapter.WEIGHTS):
        if (d / f).exists():
            raise CheckpointError(f"adapter folder '{directory}' already holds an adapter ({f}); choose another --out")
    if any(k not in meta for k in ("rank", "alpha", "scale")):
        raise ValueError("save_adapter: meta needs rank, alpha and scale")
    if abs(meta["scale"] - meta["alpha"] / meta["rank"]) > 1e-9 * abs(meta["scale"]):
        raise CheckpointError(f"adapter scale {meta['scale']} is not alpha / rank = {meta['alpha']} / {meta['rank']}; PEFT folders store alpha and r only")
    name = base_model_name_or_path if base_model_name_or_path is not None else base_model_name(meta.get("base_path"))
    hf_adapter.write_peft_adapter(
        d, adapters, rank=meta["rank"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0), base_model_name_or_path=name, like=like
    )
    (d / META_FILE).write_text(json.dumps({**meta, "format": FORMAT}, indent=1))
    return d


def read_meta(directory) -> dict[str, Any]:
    """jaxeff's record of an adapter folder; for a PEFT folder made elsewhere (no adapter.json),
    one derived from its adapter_config.json (no fingerprint, no base model config)."""
    d = Path(directory)
    f = d / META_FILE
    if not f.is_file():
        if hf_adapter.is_peft_folder(d):
            raw = hf_adapter.read_peft_config(d)
            return {
                "format": "peft",
                "method": "lora",
                "rank": int(raw["r"]),
                "alpha": float(raw["lora_alpha"]),
                "scale": hf_adapter.peft_scale(raw),
                "dropout": float(raw.get("lora_dropout") or 0.0),
                "targets": raw.get("target_modules"),
                "base_fingerprint": None,
                "base_path": raw.get("base_model_name_or_path"),
                "base_model": None,
            }
        if not d.is_dir():
            raise CheckpointError(f"adapter folder '{directory}' does not exist")
        raise CheckpointError(f"adapter folder '{directory}' has neither {hf_adapter.CONFIG} (a PEFT LoRA adapter) nor {META_FILE} (a jaxeff adapter)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{f}' is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_ORBAX):
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"'{f}': unknown format {got!r} (expected {FORMAT} or {FORMAT_ORBAX})")
    if meta["format"] == FORMAT:
        raw = hf_adapter.read_peft_config(d)
        if int(raw["r"]) != meta["rank"] or abs(hf_adapter.peft_scale(raw) - meta["scale"]) > 1e-9 * meta["scale"]:
            raise CheckpointError(
                f"'{d}': {hf_adapter.CONFIG} (r={raw['r']}, lora_alpha={raw['lora_alpha']}) "
                f"disagrees with {META_FILE} (rank={meta['rank']}, alpha={meta['alpha']})"
            )
    return meta


def _structure(meta, base, like):
    """The parameter tree (or ShapeDtypeStructs) whose kernels PEFT tensor names are mapped onto."""
    if base is not None:
        return base
    if like is not None:
        return like
    if meta.get("base_model"):
        from jaxeff.interop.shapes import abstract_params
        from jaxeff.models.config import TransformerConfig

        return abstract_params(TransformerConfig(**meta["base_model"]))
    raise ValueError("load_adapter: a PEFT folder without adapter.json needs base= or like= (the base's parameters)")


def load_adapter(directory, *, base=None, model_cfg: dict | None = None, expected_fingerprint: str | None = None, like=None) -> tuple[Any, dict[str, Any]]:
    """``(adapters, meta)`` of an adapter folder. With ``base`` + ``model_cfg`` (or a precomputed
    ``expected_fingerprint``) an adapter that records its base (jaxeff's ``adapter.json``) must
    belong to that base, else CheckpointError. A PEFT folder from elsewhere records none: it is
    checked against ``base`` (or ``like``, the base's ShapeDtypeStructs) by names and shapes."""
    meta = read_meta(directory)
    if base is not None:
        if model_cfg is None:
            raise ValueError("load_adapter: pass model_cfg with base")
        if meta.get("base_model"):
            check_same_model({"model": meta["base_model"]}, model_cfg, Path(directory))
        if meta.get("base_fingerprint"):
            expected_fingerprint = fingerprint(base, model_cfg)
    recorded = meta.get("base_fingerprint")
    if expected_fingerprint is not None and recorded is not None and expected_fingerprint != recorded:
        raise CheckpointError(
            f"adapter '{directory}' was trained on base {recorded[:12]} "
            f"({meta.get('base_path') or 'random init'}), not on this base ({expected_fingerprint[:12]}); "
            "load it onto the base it was trained on"
        )
    if meta["format"] == FORMAT_ORBAX:
        with ocp.StandardCheckpointer() as ckptr:
            adapters = ckptr.restore(Path(directory).absolute() / "weights")
        return adapters, meta
    adapters, _ = hf_adapter.read_peft_adapter(directory, _structure(meta, base, like))
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
        adapters, meta = load_adapter(directory, expected_fingerprint=self.fingerprint, like=self.base)
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


def export_adapter(run, out, step: int | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Take the adapters out of a ``lora`` / ``qlora`` run's checkpoint into an adapter folder
    (PEFT's format + ``adapter.json``). ``base_model_name_or_path`` (adapter_config.json) defaults
    to the folder of an ``hf:DIR`` ``train.init_from``, else null (the base run is in adapter.json)."""
    from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings, find_checkpoint_dir
    from jaxeff.train.loop import Trainer

    for f in (META_FILE, hf_adapter.CONFIG, hf_adapter.WEIGHTS):  # before anything is loaded
        if (Path(out) / f).exists():
            raise CheckpointError(f"adapter folder '{out}' already holds an adapter ({f}); choose another --out")
    with Checkpointer(find_checkpoint_dir(run), create=False) as ckpt:
        # its adapters are in the checkpoint: a peft.init_adapter folder need not exist any more
        cfg = one_device_config(ckpt.read_config(step), **{"peft.init_adapter": None})
        if cfg.method not in ("lora", "qlora"):
            raise CheckpointError(f"checkpoint '{ckpt.directory}' is a '{cfg.method}' run; expected a lora or qlora run")
        trainer = Trainer(cfg, devices=jax.devices()[:1], purpose="load")
        params = ckpt.restore_params(abstract_with_shardings(trainer.abstract_state.params, trainer.param_shardings), step)
    base = trainer.base_params()  # the base the run started from (qlora's factory read it already: read once)
    return save_adapter(
        out, params["lora"], adapter_meta(cfg, fingerprint(base, cfg.to_dict()["model"])), like=base, base_model_name_or_path=base_model_name_or_path
    )


def merge_adapter(base_run, adapter_dir, out_run) -> Path:
    """Fold an adapter into a base run's parameters and save them as a new run (method lm)."""
    from jaxeff.runs import load_model_params, read_config, save_model_run

    out = Path(out_run)
    read_meta(adapter_dir)  # a bad folder fails before anything is loaded
    cfg = one_device_config(read_config(base_run), **new_lm_run(out))
    _, base = load_model_params(base_run)  # any method's run: its model parameters (adapters merged, ...)
    adapters, meta = load_adapter(adapter_dir, base=base, model_cfg=cfg.to_dict()["model"])
    save_model_run(
        merge(base, adapters, meta["scale"]),
        cfg,
        provenance={
            "command": "jaxeff merge-adapter",
            "base": str(Path(base_run).absolute()),
            "adapter": str(Path(adapter_dir).absolute()),
            "data": "as the base run",
        },
    )
    return out


def import_adapter(base_run, adapter_dir, out_run) -> Path:
    """A ``lora`` run (step 0, fresh optimizer state) holding a base run's parameters and an
    adapter folder's adapters (PEFT's format or jaxeff's), unmerged: ``generate`` / ``eval`` run it
    with the adapter applied at run time, ``export-adapter`` takes it out again, and training it
    further is ``train.init_from=BASE peft.init_adapter=DIR`` with the same rank, alpha and targets.
    The run's config is the base's with ``method: lora`` and ``peft`` set from the adapter: rank,
    ``alpha = scale · rank`` (PEFT's rsLoRA scale included), dropout, and targets that match
    exactly the adapted modules."""
    import re

    from jaxeff.peft.lora import adapter_paths
    from jaxeff.runs import load_model_params, read_config
    from jaxeff.train.checkpoint import find_checkpoint_dir
    from jaxeff.train.loop import Trainer

    out = Path(out_run)
    meta = read_meta(adapter_dir)  # a bad folder fails before anything is loaded
    saved = read_config(base_run)
    base_cfg = one_device_config(saved)
    if base_cfg.method != "lm":
        raise CheckpointError(
            f"--base: '{find_checkpoint_dir(base_run)}' is a '{base_cfg.method}' run; expected a plain lm run (e.g. jaxeff convert --from-hf's or merge-adapter's)"
        )
    _, base = load_model_params(base_run)
    adapters, meta = load_adapter(adapter_dir, base=base, model_cfg=base_cfg.to_dict()["model"])
    paths = adapter_paths(adapters)
    lora = {
        **new_lm_run(out),
        "method": "lora",
        "train.init_from": str(base_run),
        "peft.rank": int(meta["rank"]),
        "peft.alpha": float(meta["scale"]) * int(meta["rank"]),
        "peft.dropout": float(meta.get("dropout") or 0.0),
        "peft.targets": [re.escape("/".join(p)) for p in paths],
    }
    built = one_device_config(saved, **lora, **{"peft.init_adapter": str(Path(adapter_dir).absolute())})
    cfg = one_device_config(saved, **lora, **{"peft.init_adapter": None})  # saved: the adapters are in the checkpoint
    lora_trainer = Trainer(built, devices=jax.devices()[:1])
    state = lora_trainer.init_state(base)
    with open_new_run(cfg, out) as out_ckpt:
        out_ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    return out
