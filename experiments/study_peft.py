"""Study: full fine-tuning vs LoRA (two ranks) vs QLoRA vs BitFit, from one pretrained base.

1. pretrain a small base (biases on, so BitFit has something to train) on four domains of the
   embedded synthetic corpus (``arithmetic, records, prose, code``; ``recall`` has weight 0);
2. fine-tune it on the held-out domain ``recall`` (weights: recall 1, the rest 0) with each method,
   starting from the base through ``train.init_from``, same steps, batch and schedule; the
   learning rate per method is the one usual for it (full: 1e-3, LoRA/QLoRA: 3e-3, BitFit: 1e-2);
3. evaluate every run on all five domains: loss on the new domain, mean loss on the old four
   (forgetting), and print one table with the trainable share, optimizer-state bytes, the bytes
   of the whole train state (params + optimizer state + frozen inputs; for QLoRA the NF4 base
   and its bytes per parameter), the process's peak resident memory and the step time.

Each fine-tune runs in its own Python process, so "peak RSS" is that process's ``ru_maxrss``
(JAX runtime, data and compilation included: at this model size it is dominated by them, not by
the parameters -- the "state bytes" column is the number that scales with the model). Step time is
``perf/step_time_s`` of the last logging window (after compilation, evaluation excluded).
QLoRA's base matmul runs the jnp dequantize-then-matmul reference on CPU (``peft.kernel_backend:
auto``); the Pallas kernel path is checked in tests/jaxeff/test_peft.py.

TensorBoard: <run-dir>/peft_study[_quick]/{base,full,lora_r4,lora_r16,qlora_r8,bitfit} (deleted
and rewritten on every run); eval/loss/<domain> shows forgetting on the old domains over steps.

    python experiments/study_peft.py --quick        # < 3 min on a 2-core CPU
    python experiments/study_peft.py                # quickstart size, longer
    tensorboard --logdir runs/peft_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import time
from pathlib import Path

from _common import REPO, add_study_args, mixture, print_result, quick_overrides, run_worker, study_dir, train_run, train_steps

OLD = ("arithmetic", "records", "prose", "code")
NEW = "recall"
QUICK = quick_overrides(n_layers=2)
# name -> (method, overrides)
VARIANTS = {
    "full": ("lm", ["optim.lr=1e-3"]),
    "lora_r4": ("lora", ["peft.rank=4", "peft.alpha=8", "optim.lr=3e-3"]),
    "lora_r16": ("lora", ["peft.rank=16", "peft.alpha=32", "optim.lr=3e-3"]),
    "qlora_r8": ("qlora", ["peft.rank=8", "peft.alpha=16", "optim.lr=3e-3", "model.dtype=bfloat16"]),
    "bitfit": ("bitfit", ["optim.lr=1e-2"]),
}


def config(args, name: str, method: str, steps: int, extra: list[str]):
    from jaxeff.config import load_config

    weights = {d: (1.0 if (d == NEW) == (name != "base") else 0.0) for d in OLD + (NEW,)}
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        (QUICK if args.quick else [])
        + [
            f"name={name}",
            f"method={method}",
            f"logging.run_dir={args.run_dir}",
            "logging.progress=false",
            "model.use_bias=true",
            *mixture(weights),
            *train_steps(steps),
            "train.eval_batches=2",
            "optim.weight_decay=0.0",
            "optim.warmup_steps=10",
        ]
        + extra,
    )


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def worker(args) -> None:
    """One training run in this process; prints one JSON line of results."""
    from jaxeff.train.loop import Trainer

    name = args.worker
    if name == "base":
        cfg = config(args, "base", "lm", args.base_steps, ["optim.lr=3e-3"])
    else:
        method, extra = VARIANTS[name]
        cfg = config(args, name, method, args.ft_steps, extra + [f"train.init_from={Path(args.run_dir) / 'base'}"])
    _, out, wall = train_run(cfg)
    trainer = Trainer(cfg)  # for the byte counts (no step is compiled)
    frozen = trainer.method.frozen
    row = {
        "name": name,
        "method": cfg.method,
        "wall_s": wall,
        "new": out[f"eval/loss/{NEW}"],
        "old": sum(out[f"eval/loss/{d}"] for d in OLD) / len(OLD),
        "trainable": out["params/trainable"],
        "trainable_pct": out["params/trainable_pct"],
        "opt_state_bytes": out["params/opt_state_bytes"],
        "state_bytes": tree_bytes(trainer.abstract_state.params) + out["params/opt_state_bytes"] + (tree_bytes(frozen) if frozen is not None else 0),
        "step_time_s": out["perf/step_time_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cfg.method == "qlora":
        from jaxeff.peft.qlora import qbase_stats

        row["qbase"] = qbase_stats(frozen["qbase"])
    print_result(row)


def run_child(args, name: str) -> dict:
    argv = ["--run-dir", str(args.run_dir), "--base-steps", str(args.base_steps), "--ft-steps", str(args.ft_steps)] + (["--quick"] if args.quick else [])
    t0 = time.perf_counter()
    row = run_worker(__file__, name, argv)
    print(f"  {name:9s} {time.perf_counter() - t0:5.0f}s  new {row['new']:.4f}  old {row['old']:.4f}", flush=True)
    return row


def table(rows: list[dict], base: dict) -> str:
    head = (
        "| run | method | eval loss new (recall) | eval loss old (4 domains) | trainable | trainable % | "
        "optimizer state | train state (params+opt+frozen) | peak RSS | step time |"
    )
    lines = [head, "|" + "---|" * 10]
    lines.append(f"| base (no fine-tune) | lm | {base['new']:.4f} | {base['old']:.4f} | - | - | - | - | - | - |")
    for r in rows:
        extra = ""
        if "qbase" in r:
            q = r["qbase"]
            extra = f" (NF4 base {q['bytes'] / 1e3:.1f} KB, {q['bytes_per_param']:.3f} B/param)"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['new']:.4f} | {r['old']:.4f} | {r['trainable']:,} | "
            f"{r['trainable_pct']:.2f} | {r['opt_state_bytes'] / 1e3:.1f} KB | {r['state_bytes'] / 1e3:.1f} KB{extra} | "
            f"{r['peak_rss_mb']:.0f} MB | {1e3 * r['step_time_s']:.1f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(p, "peft", "small model, few steps (< 3 min on a 2-core CPU)", owns_run_dir=True)
    p.add_argument("--base-steps", type=int, default=None)
    p.add_argument("--ft-steps", type=int, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.run_dir = str(study_dir(args))
    args.base_steps = args.base_steps or (150 if args.quick else 600)
    args.ft_steps = args.ft_steps or (60 if args.quick else 300)
    if args.worker:
        worker(args)
        return
    t0 = time.perf_counter()
    print(
        f"PEFT study ({'quick' if args.quick else 'full'}): base {args.base_steps} steps on {', '.join(OLD)}; "
        f"fine-tunes {args.ft_steps} steps on {NEW}; runs in {args.run_dir}",
        flush=True,
    )
    base = run_child(args, "base")
    rows = [run_child(args, name) for name in VARIANTS]
    out = table(rows, base)
    cmd = "python experiments/study_peft.py" + (" --quick" if args.quick else "")
    text = f"{cmd}  ({datetime.date.today()}, {time.perf_counter() - t0:.0f} s)\n\n{out}\n"
    print("\n" + text)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / "results.md").write_text(text)
    (Path(args.run_dir) / "results.json").write_text(json.dumps({"base": base, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
