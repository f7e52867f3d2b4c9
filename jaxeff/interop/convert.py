"""``jaxeff convert``: Hugging Face folder <-> jaxeff run folder.

::

    jaxeff convert --from-hf models/SmolLM2-135M                     # print the matching `model:` YAML section
    jaxeff convert --from-hf models/SmolLM2-135M --out runs/smol     # a run that eval / generate / init_from accept
    jaxeff convert --from runs/smol_ft --to-hf exports/smol_ft       # back to HF (any method: model_params)

The converted run holds the model parameters only (step 0, method ``lm``, no optimizer state: eval,
generate and ``train.init_from`` read it; resuming it is refused). Its ``config.yaml`` starts with a
``provenance`` mapping (command, source folder) and has the model section of ``config.json``, the
folder's ``tokenizer.json`` when there is one (else the byte tokenizer), and the data it was trained
on only when that is known: an export of a jaxeff run (``--to-hf``) carries the run's data section in
``jaxeff_run.yaml``, which ``--from-hf`` reads back, so a round trip evaluates exactly as the source
run (``jaxeff eval --checkpoint runs/back``). Otherwise the run records ``provenance.data: unknown``
and ``jaxeff eval`` asks for a YAML naming the data to evaluate.

``--to-hf`` writes ``config.json`` + safetensors, ``tokenizer.json`` (the byte tokenizer as a
``tokenizers`` file, or a copy of the run's), ``generation_config.json`` (bos/eos/pad ids) and
``jaxeff_run.yaml`` (the source run, step, method and data section; transformers ignores it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import yaml

from jaxeff.errors import ConfigError


def check_new_folder(path, field: str) -> None:
    """A one-line error unless folder ``path`` can be made (or exists as a folder): its nearest existing
    ancestor must be a writable folder, not a file."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}: '{path}' is a file (expected a folder)")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{field}: cannot make '{path}': '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot make '{path}': '{parent}' is not writable")


def model_section(hf_dir, dtype=None) -> dict:
    """The ``model:`` section (a dict) of a jaxeff config for a Hugging Face folder."""
    from jaxeff.interop.hf import model_config

    return json.loads(json.dumps(dataclasses.asdict(model_config(hf_dir, dtype))))


RUN_FILE = "jaxeff_run.yaml"  # in an HF export: the source run's provenance and data section


def _export_record(hf_dir: Path) -> dict | None:
    """The ``jaxeff_run.yaml`` an export of a jaxeff run carries (None when absent or unreadable)."""
    p = hf_dir / RUN_FILE
    if not p.is_file():
        return None
    try:
        rec = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("data"), dict) else None


def from_hf(hf_dir, out_run, *, dtype=None) -> Path:
    """Write a jaxeff run folder (model parameters at step 0 + config.yaml) holding an HF model's weights."""
    from jax.sharding import SingleDeviceSharding

    from jaxeff.config import from_dict
    from jaxeff.interop.hf import load_weights
    from jaxeff.runs import abstract_model_params, check_new_run, save_model_run

    hf_dir, out = Path(hf_dir), Path(out_run)
    model = model_section(hf_dir, dtype)
    tokenizer = hf_dir / "tokenizer.json"
    record = _export_record(hf_dir)
    provenance = {"command": "jaxeff convert --from-hf", "source": str(hf_dir.absolute())}
    raw = {"name": out.name, "method": "lm", "model": model, "logging": {"run_dir": str(out.parent.absolute())}}
    if record is not None:  # an export of a jaxeff run: its own data and eval settings
        raw["data"] = record["data"]
        if isinstance(record.get("eval_batches"), int):
            raw["train"] = {"eval_batches": record["eval_batches"]}
        provenance.update({k: record[k] for k in ("run", "step", "method") if k in record})
        provenance["data"] = f"as the exported run ({RUN_FILE})"
        if raw["data"].get("tokenizer", "byte") != "byte" and tokenizer.is_file():
            raw["data"] = {**raw["data"], "tokenizer": str(tokenizer.absolute())}
    else:
        raw["data"] = {"tokenizer": str(tokenizer.absolute()) if tokenizer.is_file() else "byte", "seq_len": min(128, model["max_seq_len"])}
        provenance["data"] = "unknown"
    cfg = from_dict(raw)
    # Everything is checked before the first folder is made: the destination, then every tensor.
    check_new_folder(out, "--out")
    check_new_run(out)
    abstract = abstract_model_params(cfg.to_dict())
    one = SingleDeviceSharding(jax.devices()[0])
    params = load_weights(hf_dir, abstract, jax.tree.map(lambda _: one, abstract), tied=cfg.model.tie_embeddings)
    return save_model_run(params, cfg, provenance=provenance)  # parameters only: the run is the model


def to_hf(run, hf_dir, *, step: int | None = None, dtype=None) -> Path:
    """Write a run's model parameters (``Method.model_params``: adapters merged) as an HF folder, with
    its tokenizer.json, generation_config.json and jaxeff_run.yaml."""
    from jaxeff.interop.hf import save_pretrained
    from jaxeff.interop.tokenizer_export import write_tokenizer_files
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import find_checkpoint_dir, one_device_config
    from jaxeff.train.loop import load_params

    check_new_folder(hf_dir, "--to-hf")
    ckpt_dir = find_checkpoint_dir(run)
    saved = read_config(ckpt_dir, step)
    cfg = one_device_config(saved, **{"data.batch_size": 1})
    trainer, params = load_params(cfg, ckpt_dir, step, devices=jax.devices()[:1])
    out = save_pretrained(cfg.model, trainer.method.model_params(params), hf_dir, dtype=dtype)
    write_tokenizer_files(out, cfg.data.tokenizer, cfg.model.max_seq_len)
    if step is None:
        from jaxeff.train.checkpoint import Checkpointer

        with Checkpointer(ckpt_dir, create=False) as ckpt:
            step = ckpt.latest_step()
    data = dict(saved.get("data", {}))
    record = {
        "run": str(Path(run).absolute()),
        "step": int(step),
        "method": saved.get("method", "lm"),
        "provenance": saved.get("provenance"),
        "data": data,
        "eval_batches": saved.get("train", {}).get("eval_batches"),
    }
    (out / RUN_FILE).write_text(
        "# the jaxeff run this folder was exported from (jaxeff convert --to-hf);"
        " convert --from-hf reads its data section back\n" + yaml.safe_dump({k: v for k, v in record.items() if v is not None}, sort_keys=False)
    )
    return out


def main(args) -> int:
    """The ``jaxeff convert`` subcommand (arguments parsed by jaxeff.cli)."""
    if args.from_hf and args.from_run:
        raise ConfigError("convert: give either --from-hf DIR or --from RUN_DIR, not both")
    dtypes = ("float32", "bfloat16") + (("float16",) if args.from_run else ())
    if args.dtype is not None:
        try:
            name = jax.numpy.dtype(args.dtype).name
        except TypeError:
            name = None
        if name not in dtypes:
            raise ConfigError(f"--dtype: expected {' or '.join(dtypes)} (got {args.dtype!r})")
    if args.from_hf:
        if args.to_hf:
            raise ConfigError("convert: --to-hf goes with --from RUN_DIR")
        if not args.out:
            print(yaml.safe_dump({"model": model_section(args.from_hf, args.dtype)}, sort_keys=False), end="")
            return 0
        print(f"converted {args.from_hf} to run {from_hf(args.from_hf, args.out, dtype=args.dtype)}")
        return 0
    if args.from_run:
        if not args.to_hf:
            raise ConfigError("convert: --from RUN_DIR needs --to-hf DIR")
        print(f"saved {to_hf(args.from_run, args.to_hf, step=args.step, dtype=args.dtype)} (Hugging Face format)")
        return 0
    raise ConfigError("convert: give --from-hf DIR [--out RUN_DIR] or --from RUN_DIR --to-hf DIR")


__all__ = ["from_hf", "to_hf", "model_section", "main"]
