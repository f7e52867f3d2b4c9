"""Check jaxeff's Hugging Face interop against real ``transformers`` (both directions, float32 logits).

transformers is not a jaxeff dependency, so this runs in two Python environments that talk
through files in a temporary folder:

* jaxeff side (this venv): builds tiny random models, ``save_pretrained`` writes them, jaxeff
  computes their logits on fixed tokens; later it ``load_pretrained``-s the models transformers
  wrote and compares logits.
* transformers side (``--transformers-python``, run as a subprocess with ``HF_HUB_OFFLINE=1``):
  ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)`` of every jaxeff folder
  (eager attention, float32) and its logits on the same tokens; and random models made by
  transformers itself (``from_config``, weights and biases randomised), saved with
  ``save_pretrained(safe_serialization=True)``, with their logits; two of them also saved in
  bfloat16 (in shards, with an index) and float16, their logits computed in float32 from the
  rounded weights.

Prints one row per model and direction (max |diff| of the logits, max |logit|) and exits 1 if a
difference exceeds 1e-4 or is NaN. Not part of CI (it needs the second environment)::

    python3 -m venv /tmp/hfcheck    # Python 3.11 here; outside the repo
    /tmp/hfcheck/bin/pip install torch==2.13.0 'transformers<5' safetensors numpy
    .venv/bin/python experiments/check_transformers.py --transformers-python /tmp/hfcheck/bin/python
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
SEQ, BATCH = 12, 2

# name -> (jaxeff TransformerConfig kwargs, transformers model_type, transformers config kwargs)
CASES: dict[str, tuple[dict, str, dict]] = {
    "llama_gqa_llama3_tied": (
        dict(
            vocab_size=97,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=96,
            rope_theta=500000.0,
            rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
            tie_embeddings=True,
        ),
        "llama",
        dict(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            tie_word_embeddings=True,
        ),
    ),
    "llama_mqa_untied_head_dim": (
        dict(vocab_size=89, d_model=48, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=80, tie_embeddings=False),
        "llama",
        dict(
            vocab_size=89,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=False,
        ),
    ),
    "llama_linear_rope_bias": (
        dict(
            vocab_size=61,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=4,
            d_ff=64,
            use_bias=True,
            rope_scaling=dict(type="linear", factor=2.0),
            tie_embeddings=False,
        ),
        "llama",
        dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_qkv_bias": (
        dict(
            vocab_size=101,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=96,
            qkv_bias=True,
            rope_theta=1000000.0,
            norm_eps=1e-6,
            tie_embeddings=False,
        ),
        "qwen2",
        dict(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_window_in_upper_layers": (
        dict(vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, qkv_bias=True, sliding_window=(None, 4, 4), tie_embeddings=True),
        "qwen2",
        dict(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "mistral_sliding_window": (
        dict(vocab_size=83, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, sliding_window=4, tie_embeddings=False),
        "mistral",
        dict(
            vocab_size=83,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
            tie_word_embeddings=False,
        ),
    ),
}


# transformers -> jaxeff only: name -> (case whose config it uses, dtype transformers saves, max_shard_size)
SAVED_BY_TRANSFORMERS = {
    "qwen2_qkv_bias bf16, sharded": ("qwen2_qkv_bias", "bfloat16", "40KB"),
    "llama_mqa_untied_head_dim fp16": ("llama_mqa_untied_head_dim", "float16", None),
}


def tokens_for(vocab: int) -> np.ndarray:
    return np.random.default_rng(vocab).integers(0, vocab, (BATCH, SEQ)).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# transformers side (imports torch and transformers only)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def hf_side(job_file: str) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    job = json.loads(Path(job_file).read_text())
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    as_f32 = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}  # renamed in 4.56
    for item in job["load"]:  # folders jaxeff wrote
        model = AutoModelForCausalLM.from_pretrained(item["folder"], local_files_only=True, **as_f32, attn_implementation="eager")
        model.eval()
        np.save(item["out"], _hf_logits(model, np.load(item["tokens"])))
    for item in job["make"]:  # models transformers makes, for jaxeff to load
        config = AutoConfig.for_model(item["model_type"], **item["config"])
        torch.manual_seed(item["seed"])
        model = AutoModelForCausalLM.from_config(config, **as_f32, attn_implementation="eager")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif "embed_tokens" in name:
                    p.copy_(torch.randn_like(p))
                else:  # [out, in]
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        model.eval()
        save_dtype = getattr(torch, item.get("save_dtype") or "float32")
        with torch.no_grad():  # the parameters as they will be stored (not buffers such as RoPE's inv_freq)
            for p in model.parameters():
                p.copy_(p.to(save_dtype).to(torch.float32))
        np.save(item["out"], _hf_logits(model, np.load(item["tokens"])))
        model.to(save_dtype).save_pretrained(item["folder"], safe_serialization=True, max_shard_size=item.get("max_shard_size") or "5GB")
    Path(job["versions"]).write_text(json.dumps(versions))


# ------------------------------------------------------------------------------------------------
# jaxeff side


def _random_params(cfg, seed: int):
    """Every parameter random (biases and norm scales too, so a dropped or misnamed one shows)."""
    import jax

    from jaxeff.interop.shapes import abstract_params

    rng = np.random.default_rng(seed)

    def make(path, x):
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf == "scale":
            a = 1 + 0.1 * rng.standard_normal(x.shape)
        elif leaf == "bias":
            a = 0.1 * rng.standard_normal(x.shape)
        elif leaf == "embedding":
            a = rng.standard_normal(x.shape)
        else:  # kernel [in, out]
            a = rng.standard_normal(x.shape) / x.shape[0] ** 0.5
        if str(getattr(path[0], "key", path[0])) == "lm_head" and leaf == "bias":
            a = np.zeros(x.shape)  # Hugging Face has no lm_head bias
        return jax.device_put(a.astype(np.float32))

    return jax.tree_util.tree_map_with_path(make, abstract_params(cfg))


def _jaxeff_logits(model, params, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)).logits, np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transformers-python", help="python of a venv with torch and transformers")
    ap.add_argument("--hf-side", help=argparse.SUPPRESS)  # internal: the transformers half
    ap.add_argument("--keep", help="write the folders here and keep them (default: a temp dir)")
    args = ap.parse_args()
    if args.hf_side:
        hf_side(args.hf_side)
        return 0
    if not args.transformers_python or not Path(args.transformers_python).is_file():
        print(
            f"error: --transformers-python {args.transformers_python!r} is not a file (a python with torch and transformers; see this script's docstring)",
            file=sys.stderr,
        )
        return 2
    from jaxeff.interop import load_pretrained, save_pretrained
    from jaxeff.models import Transformer, TransformerConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        job: dict = {"load": [], "make": [], "versions": str(root / "versions.json")}
        mine: dict[str, np.ndarray] = {}
        for i, (name, (kw, model_type, hf_kw)) in enumerate(CASES.items()):
            cfg = TransformerConfig(**kw, max_seq_len=64, param_dtype="float32", dtype="float32")
            model = Transformer(cfg)
            tokens = tokens_for(cfg.vocab_size)
            np.save(root / f"{name}.tokens.npy", tokens)
            save_pretrained(model, _random_params(cfg, seed=i), root / f"jaxeff_{name}")
            mine[name] = _jaxeff_logits(model, _random_params(cfg, seed=i), tokens)
            job["load"].append(
                {"folder": str(root / f"jaxeff_{name}"), "tokens": str(root / f"{name}.tokens.npy"), "out": str(root / f"{name}.hf_logits_of_jaxeff.npy")}
            )
            job["make"].append(
                {
                    "model_type": model_type,
                    "config": {**hf_kw, "max_position_embeddings": 64},
                    "seed": i,
                    "folder": str(root / f"hf_{name}"),
                    "tokens": str(root / f"{name}.tokens.npy"),
                    "out": str(root / f"{name}.hf_logits.npy"),
                }
            )
        for name, (case, save_dtype, max_shard_size) in SAVED_BY_TRANSFORMERS.items():
            item = next(m for m in job["make"] if m["folder"] == str(root / f"hf_{case}"))
            job["make"].append(
                {
                    **item,
                    "save_dtype": save_dtype,
                    "max_shard_size": max_shard_size,
                    "folder": str(root / f"hf_{case}_{save_dtype}"),
                    "out": str(root / f"{case}_{save_dtype}.hf_logits.npy"),
                }
            )
        (root / "job.json").write_text(json.dumps(job, indent=1))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
        subprocess.run([args.transformers_python, str(Path(__file__).resolve()), "--hf-side", str(root / "job.json")], env=env, check=True)
        versions = json.loads((root / "versions.json").read_text())
        print(f"transformers {versions['transformers']}, torch {versions['torch']}; float32 logits, tokens [{BATCH}, {SEQ}]")
        rows = []
        for name in CASES:
            theirs = np.load(root / f"{name}.hf_logits_of_jaxeff.npy")
            rows.append((name, "jaxeff save -> transformers load", theirs, mine[name]))
            model, params = load_pretrained(root / f"hf_{name}", dtype="float32")
            ours = _jaxeff_logits(model, params, np.load(root / f"{name}.tokens.npy"))
            rows.append((name, "transformers save -> jaxeff load", ours, np.load(root / f"{name}.hf_logits.npy")))
        for name, (case, save_dtype, _) in SAVED_BY_TRANSFORMERS.items():
            folder = root / f"hf_{case}_{save_dtype}"
            model, params = load_pretrained(folder, dtype="float32")  # widening the stored values is exact
            ours = _jaxeff_logits(model, params, np.load(root / f"{case}.tokens.npy"))
            rows.append((name, "transformers save -> jaxeff load", ours, np.load(root / f"{case}_{save_dtype}.hf_logits.npy")))
            shards = len(list(folder.glob("*.safetensors")))
            assert shards > 1 or "sharded" not in name, f"{folder}: expected several shards, found {shards}"
        failed = 0
        print(f"| {'model':30} | {'direction':34} | max abs diff | max abs logit |")
        print(f"|{'-' * 32}|{'-' * 36}|-------------:|--------------:|")
        for name, direction, a, b in rows:
            diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("nan")
            bad = not diff <= TOLERANCE
            failed += bad
            print(f"| {name:30} | {direction:34} | {diff:12.2e} | {float(np.max(np.abs(b))):13.2f} |" + ("  FAIL" if bad else ""))
        print(f"{len(rows) - failed}/{len(rows)} within {TOLERANCE:g}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
