"""Training throughput: tokens/s and MFU of the jitted, sharded train step.

Checks correctness first (the initial loss is ln(vocab) within 0.5 — tied embeddings add ~var(logits)/2 — and falls on a repeated
batch), then times steps after compilation and prints a table. MFU = model FLOPs per token
(6 per matmul weight + attention, PaLM appendix) × tokens/s ÷ (peak FLOP/s × devices).

    python experiments/bench_train.py --model quickstart            # CPU-sized
    python experiments/bench_train.py --model 125m --dtype bfloat16  # on a GPU
    python experiments/bench_train.py --model 125m --batch 2 --seq 128 --steps 3   # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import math
import time

import jax
import numpy as np

from jaxeff.config import from_dict
from jaxeff.train.loop import Trainer, peak_flops_per_device

MODELS = {
    # the quickstart model of configs/quickstart.yaml
    "quickstart": dict(vocab_size=264, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    # ~124M parameters (GPT-2 small scale) with a 32k vocabulary
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2560),
}


def make_batch(rng, batch, seq, vocab):
    toks = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="quickstart")
    ap.add_argument("--batch", type=int, default=None, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: by device kind)")
    args = ap.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    batch = args.batch or (16 if on_cpu else 32)
    seq = args.seq or (128 if args.model == "quickstart" else 1024)
    arch = {**MODELS[args.model], "max_seq_len": max(seq, 128), "dtype": args.dtype, "attention_impl": args.attention, "remat": args.remat}
    raw = {
        "name": "bench",
        "model": arch,
        "data": {"seq_len": seq, "batch_size": batch},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "train": {"steps": 1000, "peak_flops": args.peak_flops},
        "logging": {"progress": False},
    }
    cfg = from_dict(raw)
    trainer = Trainer(cfg)
    rng = np.random.default_rng(0)
    fixed = make_batch(rng, batch, seq, cfg.model.vocab_size)

    # correctness: initial loss ~ ln(vocab) on random tokens; it falls on a repeated batch
    state = trainer.init_state()
    state, m0 = trainer.train_step(state, fixed)
    loss0 = float(m0["loss"])
    assert math.isfinite(loss0) and abs(loss0 - math.log(cfg.model.vocab_size)) < 0.5, loss0
    for _ in range(2):
        state, m = trainer.train_step(state, fixed)
    assert float(m["loss"]) < loss0, (loss0, float(m["loss"]))
    jax.block_until_ready(state)

    batches = [make_batch(rng, batch, seq, cfg.model.vocab_size) for _ in range(args.steps)]
    t0 = time.perf_counter()
    for b in batches:
        state, m = trainer.train_step(state, b)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = batch * seq / dt
    peak = args.peak_flops or peak_flops_per_device(cfg)
    flops_tok = cfg.model.flops_per_token(seq)
    mfu = flops_tok * tok_s / (peak * jax.device_count()) if peak else float("nan")

    dev = jax.devices()[0]
    print(f"# bench_train {datetime.date.today()} on {jax.device_count()} x {dev.device_kind} ({jax.default_backend()})")
    print("| model | params | dtype | attention | batch x seq | step (ms) | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {trainer.n_params / 1e6:.1f}M | {args.dtype} | {args.attention} | {batch} x {seq} | "
        f"{dt * 1e3:.1f} | {tok_s:,.0f} | {flops_tok * tok_s / 1e12:.3f} | "
        f"{'n/a (peak unknown)' if not peak else f'{100 * mfu:.1f}%'} |"
    )


if __name__ == "__main__":
    main()
