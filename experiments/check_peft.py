"""Check jaxeff's LoRA adapters against real Hugging Face PEFT (both directions, float32 logits).

peft, transformers and torch are not jaxeff dependencies, so this runs in two Python environments
that talk through files in a temporary folder (like experiments/check_transformers.py):

* jaxeff side (this venv), all through the ``jaxeff`` CLI: trains a tiny base run, a LoRA run
  (all seven projections, dropout 0.1), a LoRA run on q of every layer and up of layer 1 only
  (``target_modules`` with full module names) and a QLoRA run (q and v) from it, ``export-adapter``-s
  them, ``convert --to-hf``-s the base, and computes the logits of the LoRA runs (adapters
  unmerged) and of the base with the QLoRA adapter (its bf16 A and B, on the float base) on fixed
  tokens. Later it takes adapters PEFT made, ``import-adapter``-s them as lora runs and
  ``merge-adapter``-s them into the base, and computes both runs' logits.
* PEFT side (``--peft-python``, run as a subprocess with ``HF_HUB_OFFLINE=1``):
  ``AutoModelForCausalLM.from_pretrained`` of the converted base (float32, eager attention),
  ``PeftModel.from_pretrained`` of each jaxeff adapter (the loaded adapter state dict must equal the
  file's tensors, name for name), logits; and adapters PEFT makes itself with ``get_peft_model``
  (random A and B: ``init_lora_weights=False``): rsLoRA r=8 on all seven projections, and r=4 on
  q/v of layer 1 only (``layers_to_transform``), saved with ``save_pretrained``, with their logits.

Prints one row per adapter and direction (max |diff| of the logits, max |logit|, and how far the
adapter moves the logits from the base's, so a dropped adapter cannot pass) and exits 1 if a
difference exceeds 1e-4 or is NaN. Not part of CI (it needs the second environment)::

    python3 -m venv /tmp/peftcheck      # Python 3.11 here; outside the repo
    /tmp/peftcheck/bin/pip install torch 'transformers<5' peft safetensors numpy   # torch: CPU wheel
    .venv/bin/python experiments/check_peft.py --peft-python /tmp/peftcheck/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4
SEQ, BATCH = 16, 2
MODEL = {"vocab_size": 264, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 64, "tie_embeddings": False}
BASE = {
    "name": "base",
    "seed": 0,
    "method": "lm",
    "model": MODEL,
    "data": {"domains": ["arithmetic", "prose"], "docs_per_domain": 40, "eval_docs_per_domain": 4, "seq_len": 32, "batch_size": 8},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 4, "eval_every": 4, "eval_batches": 1, "log_every": 2},
    "checkpoint": {"every": 100},
    "logging": {"progress": False},
}
PEFT_MADE = {  # name -> LoraConfig kwargs (PEFT side)
    "peft_rslora_r8_all": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "peft_r4_qv_layer1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
}


# ------------------------------------------------------------------------------------------------
# PEFT side (imports torch, transformers and peft only)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def peft_side(job_file: str) -> None:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_file).read_text())
    tokens = np.load(job["tokens"])
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    as_f32 = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}

    def base():
        m = AutoModelForCausalLM.from_pretrained(job["base_hf"], local_files_only=True, **as_f32, attn_implementation="eager")
        return m.eval()

    np.save(job["base_out"], _logits(base(), tokens))
    report = {"versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}, "loaded": {}}
    for item in job["load"]:  # adapters jaxeff exported
        model = PeftModel.from_pretrained(base(), item["folder"])
        model.eval()
        saved = load_file(str(Path(item["folder"]) / "adapter_model.safetensors"))
        state = get_peft_model_state_dict(model)
        same_names = sorted(state) == sorted(saved)
        same_values = same_names and all(torch.equal(state[k].to(saved[k].dtype), saved[k]) for k in saved)
        report["loaded"][item["name"]] = {"tensors": len(saved), "same_names": same_names, "same_values": bool(same_values)}
        np.save(item["out"], _logits(model, tokens))
    for i, item in enumerate(job["make"]):  # adapters PEFT makes
        torch.manual_seed(100 + i)
        model = get_peft_model(base(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **item["config"]))
        with torch.no_grad():  # init_lora_weights=False draws B too; make it larger so the adapter shows
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(20.0)
        model.eval()
        np.save(item["out"], _logits(model, tokens))
        model.save_pretrained(item["folder"], safe_serialization=True)
    Path(job["report"]).write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------------
# jaxeff side


def _cli(*argv: str) -> None:
    from jaxeff.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"jaxeff {' '.join(argv)} failed with exit code {code}")


def _run_logits(run: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of a run as jaxeff evaluates it (method.run: a lora run with its adapters unmerged)."""
    import jax
    import jax.numpy as jnp

    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import one_device_config
    from jaxeff.train.loop import load_params

    cfg = one_device_config(read_config(run))
    trainer, params = load_params(cfg, run / "checkpoints", devices=jax.devices()[:1])
    out = trainer.method.run(trainer.model, params, jnp.asarray(tokens, jnp.int32))
    return np.asarray(out.logits, np.float32)


def _adapter_on_float_base(base_run: Path, adapter: Path, tokens: np.ndarray) -> np.ndarray:
    """The float base with an adapter applied unmerged (for the QLoRA adapter: PEFT runs it on the
    float base, not on jaxeff's NF4 one)."""
    import jax
    import jax.numpy as jnp

    from jaxeff.peft import apply_lora
    from jaxeff.peft.adapters import load_adapter
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import one_device_config
    from jaxeff.train.loop import load_params

    cfg = one_device_config(read_config(base_run))
    trainer, params = load_params(cfg, base_run / "checkpoints", devices=jax.devices()[:1])
    adapters, meta = load_adapter(adapter, base=params, model_cfg=cfg.to_dict()["model"])
    adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters)
    out = apply_lora(trainer.model, params, adapters, meta["scale"], jnp.asarray(tokens, jnp.int32))
    return np.asarray(out.logits, np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft-python", help="python of a venv with torch, transformers and peft")
    ap.add_argument("--peft-side", help=argparse.SUPPRESS)  # internal: the PEFT half
    ap.add_argument("--keep", help="write the folders here and keep them (default: a temp dir)")
    args = ap.parse_args()
    if args.peft_side:
        peft_side(args.peft_side)
        return 0
    if not args.peft_python or not Path(args.peft_python).is_file():
        print(
            f"error: --peft-python {args.peft_python!r} is not a file (a python with torch, transformers and peft; see this script's docstring)",
            file=sys.stderr,
        )
        return 2
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp).absolute()
        root.mkdir(parents=True, exist_ok=True)
        runs = root / "runs"
        (root / "base.yaml").write_text(yaml.safe_dump({**BASE, "logging": {**BASE["logging"], "run_dir": str(runs)}}))
        y = str(root / "base.yaml")
        _cli("train", y)
        _cli(
            "train",
            y,
            "name=lora",
            "method=lora",
            f"train.init_from={runs / 'base'}",
            "train.steps=6",
            "optim.lr=2e-2",
            "peft.rank=4",
            "peft.alpha=8",
            "peft.dropout=0.1",
        )
        _cli(
            "train",
            y,
            "name=qlora",
            "method=qlora",
            f"train.init_from={runs / 'base'}",
            "train.steps=4",
            "optim.lr=2e-2",
            "peft.rank=8",
            "peft.alpha=16",
            r"peft.targets=[layers_\d+/attn/(q|v)]",
        )
        _cli(
            "train",
            y,
            "name=lora_partial",
            "method=lora",
            f"train.init_from={runs / 'base'}",
            "train.steps=4",
            "optim.lr=2e-2",
            "peft.rank=2",
            "peft.alpha=6",
            r"peft.targets=[layers_\d+/attn/q, layers_1/mlp/up]",
        )
        _cli("export-adapter", "--checkpoint", str(runs / "lora"), "--out", str(root / "adapters" / "lora"), "--base-model", str(root / "base_hf"))
        _cli("export-adapter", "--checkpoint", str(runs / "lora_partial"), "--out", str(root / "adapters" / "lora_partial"))
        _cli("export-adapter", "--checkpoint", str(runs / "qlora"), "--out", str(root / "adapters" / "qlora"), "--base-model", str(root / "base_hf"))
        _cli("convert", "--from", str(runs / "base"), "--to-hf", str(root / "base_hf"), "--dtype", "float32")
        tokens = np.random.default_rng(0).integers(0, MODEL["vocab_size"], (BATCH, SEQ)).astype(np.int64)
        np.save(root / "tokens.npy", tokens)
        mine = {
            "lora": _run_logits(runs / "lora", tokens),
            "lora_partial": _run_logits(runs / "lora_partial", tokens),
            "qlora": _adapter_on_float_base(runs / "base", root / "adapters" / "qlora", tokens),
        }
        base_logits = _run_logits(runs / "base", tokens)
        job = {
            "tokens": str(root / "tokens.npy"),
            "base_hf": str(root / "base_hf"),
            "base_out": str(root / "base.peft_side.npy"),
            "report": str(root / "report.json"),
            "load": [{"name": n, "folder": str(root / "adapters" / n), "out": str(root / f"{n}.peft.npy")} for n in mine],
            "make": [{"name": n, "config": c, "folder": str(root / "peft_made" / n), "out": str(root / f"{n}.peft.npy")} for n, c in PEFT_MADE.items()],
        }
        (root / "job.json").write_text(json.dumps(job, indent=1))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
        subprocess.run([args.peft_python, str(Path(__file__).resolve()), "--peft-side", str(root / "job.json")], env=env, check=True)
        report = json.loads((root / "report.json").read_text())
        v = report["versions"]
        print(f"peft {v['peft']}, transformers {v['transformers']}, torch {v['torch']}; float32 logits, tokens [{BATCH}, {SEQ}]")
        rows = [("base (convert --to-hf)", "jaxeff run -> transformers", np.load(job["base_out"]), base_logits)]
        for n, theirs in ((n, np.load(root / f"{n}.peft.npy")) for n in mine):
            loaded = report["loaded"][n]
            ok = loaded["same_names"] and loaded["same_values"]
            print(f"{n}: PeftModel.from_pretrained loaded {loaded['tensors']} tensors; state dict equals the file: {ok}")
            if not ok:
                rows.append((n, "state dict differs from the file", np.full(1, np.nan), np.zeros(1)))
            rows.append((n, "jaxeff export -> PeftModel", theirs, mine[n]))
        for n in PEFT_MADE:
            folder = root / "peft_made" / n
            _cli("import-adapter", "--base", str(runs / "base"), "--adapter", str(folder), "--out", str(runs / f"imported_{n}"))
            _cli("merge-adapter", "--base", str(runs / "base"), "--adapter", str(folder), "--out", str(runs / f"merged_{n}"))
            theirs = np.load(root / f"{n}.peft.npy")
            rows.append((n, "PEFT save -> jaxeff import-adapter", _run_logits(runs / f"imported_{n}", tokens), theirs))
            rows.append((n, "PEFT save -> jaxeff merge-adapter", _run_logits(runs / f"merged_{n}", tokens), theirs))
        failed = 0
        print(f"| {'adapter':24} | {'direction':36} | max abs diff | max abs logit | adapter's effect |")
        print(f"|{'-' * 26}|{'-' * 38}|-------------:|--------------:|-----------------:|")
        for name, direction, a, b in rows:
            diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("nan")
            effect = float(np.max(np.abs(b - base_logits))) if b.shape == base_logits.shape else float("nan")
            bad = not diff <= TOLERANCE or (name != "base (convert --to-hf)" and not effect > 100 * TOLERANCE)
            failed += bad
            print(f"| {name:24} | {direction:36} | {diff:12.2e} | {float(np.max(np.abs(b))):13.2f} | {effect:16.2e} |" + ("  FAIL" if bad else ""))
        print(f"{len(rows) - failed}/{len(rows)} within {TOLERANCE:g}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
