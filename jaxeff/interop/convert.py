"""``jaxeff convert``: Hugging Face folder <-> jaxeff run folder.

::

    jaxeff convert --from-hf models/SmolLM2-135M                     # print the matching `model:` YAML section
    jaxeff convert --from-hf models/SmolLM2-135M --out runs/smol     # a run that eval / generate / init_from accept
    jaxeff convert --from runs/smol_ft --to-hf exports/smol_ft       # back to HF (any method: model_params)

The converted run holds the weights at step 0 with method ``lm`` and optimizer ``sgd`` without
momentum, so the checkpoint stays the model's size (no Adam moments). Its ``config.yaml`` has the
model section of ``config.json``, the folder's ``tokenizer.json`` when there is one (else the
byte tokenizer) and default data settings; ``jaxeff eval runs/smol/config.yaml --checkpoint runs/smol``.
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


def from_hf(hf_dir, out_run, *, dtype=None) -> Path:
    """Write a jaxeff run folder (checkpoint step 0 + config.yaml) holding an HF model's weights."""
    from jaxeff.config import from_dict
    from jaxeff.interop.hf import load_weights
    from jaxeff.train.checkpoint import open_new_run
    from jaxeff.train.loop import Trainer

    hf_dir, out = Path(hf_dir), Path(out_run)
    model = model_section(hf_dir, dtype)
    tokenizer = hf_dir / "tokenizer.json"
    raw = {"name": out.name, "method": "lm", "model": model,
           "data": {"tokenizer": str(tokenizer.absolute()) if tokenizer.is_file() else "byte",
                    "seq_len": min(128, model["max_seq_len"])},
           "optim": {"name": "sgd", "momentum": 0.0, "grad_clip": None},
           "logging": {"run_dir": str(out.parent.absolute())}}
    cfg = from_dict(raw)
    # Everything is checked before the first folder is made: the destination, then every tensor.
    check_new_folder(out, "--out")
    if cfg.checkpoint_path.is_dir():
        open_new_run(cfg, out).close()  # refuses a folder that already holds a checkpoint
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    params = load_weights(hf_dir, trainer.base_abstract, trainer.base_shardings, tied=cfg.model.tie_embeddings)
    ckpt = open_new_run(cfg, out)
    try:
        state = trainer.init_state(params)
        del params
        ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    finally:
        ckpt.close()
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out


def to_hf(run, hf_dir, *, step: int | None = None, dtype=None) -> Path:
    """Write a run's model parameters (``Method.model_params``: adapters merged) as an HF folder."""
    from jaxeff.interop.hf import save_pretrained
    from jaxeff.train.checkpoint import find_checkpoint_dir, one_device_config, read_run_config
    from jaxeff.train.loop import load_params

    check_new_folder(hf_dir, "--to-hf")
    ckpt_dir = find_checkpoint_dir(run)
    cfg = one_device_config(read_run_config(ckpt_dir, step), **{"data.batch_size": 1})
    trainer, params = load_params(cfg, ckpt_dir, step, devices=jax.devices()[:1])
    out = save_pretrained(cfg.model, trainer.method.model_params(params), hf_dir, dtype=dtype)
    tok = cfg.data.tokenizer
    if tok != "byte":  # keep the tokenizer with the weights
        src = Path(tok) / "tokenizer.json" if Path(tok).is_dir() else Path(tok)
        if src.is_file():
            (out / "tokenizer.json").write_bytes(src.read_bytes())
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
