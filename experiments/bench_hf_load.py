"""Hugging Face checkpoint load speed and peak host memory (docs/interop.md).

Writes a random checkpoint shaped like Qwen2.5-0.5B (bf16, ~0.99 GB, tied embeddings) with
``save_pretrained`` into a temporary folder, then loads it with ``load_pretrained`` in fresh
subprocesses and reports GB/s and peak resident memory (``VmHWM``) against the checkpoint
size. The file was just written, so reads come from the page cache (warm): this measures the
loader, not the disk.

    .venv/bin/python experiments/bench_hf_load.py [--layers 24] [--repeats 2] [--keep DIR] [--baseline DIR]

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/base <commit>``)
also loads with the jaxeff found there, alternating with this one run by run, so both see the
same machine load; it prints the ratio of the medians. ``--keep DIR`` reuses a checkpoint
already written there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import jax
from jaxeff.interop import load_pretrained
def hwm():  # peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's before exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
base, c0 = hwm(), cpu()
t0 = time.perf_counter()
model, params = load_pretrained(sys.argv[1], progress=False)
jax.block_until_ready(params)
dt = time.perf_counter() - t0
import jaxeff.interop.hf as hf
assert hf.__file__.startswith(sys.argv[2]), (hf.__file__, sys.argv[2])  # the checkout asked for
print(json.dumps({"seconds": dt, "cpu_seconds": cpu() - c0, "peak_rss": hwm(), "base_rss": base}))
"""


def shape(layers: int) -> dict:
    return dict(
        vocab_size=151936,
        d_model=896,
        n_layers=layers,
        n_heads=14,
        n_kv_heads=2,
        d_ff=4864,
        max_seq_len=32768,
        rope_theta=1e6,
        norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )


def write_checkpoint(folder: Path, layers: int) -> tuple[int, float, int]:
    import jax
    import ml_dtypes
    import numpy as np

    from jaxeff.interop import save_pretrained
    from jaxeff.models import Transformer, TransformerConfig, init_params

    cfg = TransformerConfig(**shape(layers))
    model = Transformer(cfg)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jax.device_put((rng.standard_normal(x.shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)), abstract)
    t0 = time.perf_counter()
    save_pretrained(model, params, folder, progress=False)
    save_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return size, save_s, cfg.param_count()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it (default: a temp dir)")
    ap.add_argument("--baseline", default=None, help="a checkout of another commit to load with too, alternating")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "qwen2.5-0.5b-shaped"
        if args.keep and (folder / "model.safetensors").is_file():
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            print(f"checkpoint: reusing {folder}, {size / 1e9:.3f} GB")
        else:
            size, save_s, n_params = write_checkpoint(folder, args.layers)
            print(
                f"checkpoint: {n_params / 1e6:.0f}M parameters, {size / 1e9:.3f} GB bf16; save_pretrained {save_s:.2f} s ({size / save_s / 1e9:.2f} GB/s)"
            )
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        versions = [("this", env, str(Path(__file__).resolve().parents[1]))]
        if args.baseline:
            base = str(Path(args.baseline).resolve())
            versions.append(("baseline", {**env, "PYTHONPATH": os.pathsep.join([base, env.get("PYTHONPATH", "")])}, base))
        seconds: dict[str, list[float]] = {label: [] for label, *_ in versions}
        for i in range(args.repeats):
            for label, version_env, root in versions:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(folder), root], capture_output=True, text=True, env=version_env, cwd=root, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[label].append(r["seconds"])
                print(
                    f"{label} load {i + 1}: {r['seconds']:.2f} s = {size / r['seconds'] / 1e9:.2f} GB/s "
                    f"({r['cpu_seconds']:.2f} CPU-s = {size / r['cpu_seconds'] / 1e9:.2f} GB per CPU-s); peak RSS "
                    f"{r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / size:.2f}x size (process before loading "
                    f"{r['base_rss'] / 1e9:.2f} GB; increase {(r['peak_rss'] - r['base_rss']) / size:.2f}x size)"
                )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.baseline:
            mine, base = statistics.median(seconds["this"]), statistics.median(seconds["baseline"])
            print(
                f"median: this {mine:.2f} s ({size / mine / 1e9:.2f} GB/s), baseline {base:.2f} s "
                f"({size / base / 1e9:.2f} GB/s): {base / mine:.2f}x faster"
            )


if __name__ == "__main__":
    main()
