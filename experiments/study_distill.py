"""Study: does a half-depth student learn more from a teacher than from the labels alone?

1. pretrain a teacher (configs/distill/teacher.yaml) on the embedded synthetic corpus;
2. train the half-depth student (a) alone (student_alone.yaml) and (b) by distillation from that
   teacher (student_kd.yaml), same steps, data order, optimizer and seed; the full study adds
   (c) distillation with the DistilBERT every-other-layer initialisation;
3. print one table: eval loss per domain, parameters, training tokens/s; the claim is that (b)
   reaches a lower mean eval loss than (a).

TensorBoard runs land in <run-dir>/distill_study/{teacher,student_alone,student_kd,...}
(``--quick``: <run-dir>/distill_study_quick/, a smaller model and fewer steps, < 3 min on a 2-core CPU).
The study owns those folders: they are deleted and rewritten on every run.

    python experiments/study_distill.py --quick
    python experiments/study_distill.py --seeds 2        # the configs' sizes (24 min on a shared 2-core CPU)
    tensorboard --logdir runs/distill_study
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import jax
import numpy as np
from _common import REPO, add_study_args, quick_overrides, study_dir, train_run

CONFIGS = REPO / "configs" / "distill"
QUICK = quick_overrides(max_seq_len=None, docs_per_domain=300, eval_batches=2)


def median_tokens_per_sec(run_path: Path) -> float:
    """Median of the logged training tokens/s, leaving out the first interval (compilation)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_path))
    acc.Reload()
    values = [e.value for e in acc.Scalars("perf/tokens_per_sec")]
    return float(np.median(values[1:] if len(values) > 1 else values))


def run(name: str, yaml_name: str, overrides: list[str]) -> dict:
    cfg, out, wall = train_run(CONFIGS / yaml_name, [f"name={name}", *overrides])
    domains = list(cfg.data.domains)
    return {
        "name": name,
        "params": cfg.model.param_count(),
        "layers": cfg.model.n_layers,
        "steps": cfg.train.steps,
        "eval": {d: out[f"eval/loss/{d}"] for d in domains},
        "mean": out["eval/loss"],
        "tok_s": median_tokens_per_sec(cfg.run_path),
        "wall_s": wall,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(
        ap,
        "distill",
        "small model and few steps (< 3 min on 2 CPU cores)",
        run_dir="runs",
        run_dir_help="TensorBoard runs go to <run-dir>/distill_study[_quick]/",
    )
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=1, help="student initialisation seeds (each trains both students)")
    args = ap.parse_args(argv)

    study = study_dir(args)
    size = QUICK if args.quick else []
    t_steps = args.teacher_steps or (300 if args.quick else 600)
    s_steps = args.student_steps or (200 if args.quick else 300)
    common = [f"logging.run_dir={study}", "logging.progress=false", *size]
    teacher_dir = study / "teacher"
    every = max(t_steps // 4, 1)
    rows = [run("teacher", "teacher.yaml", [*common, f"train.steps={t_steps}", f"train.eval_every={every}", f"checkpoint.every={t_steps}"])]
    s_common = [*common, f"train.steps={s_steps}", f"train.eval_every={max(s_steps // 4, 1)}", f"checkpoint.every={s_steps}"]
    kd = [*s_common, f"distill.teacher_checkpoint={teacher_dir}"]
    pairs = []  # (alone, kd) per seed
    for seed in range(args.seeds):
        tag = f"_seed{seed}" if args.seeds > 1 else ""
        alone = run(f"student_alone{tag}", "student_alone.yaml", [*s_common, f"seed={seed}"])
        kd_row = run(f"student_kd{tag}", "student_kd.yaml", [*kd, f"seed={seed}"])
        rows += [alone, kd_row]
        pairs.append((alone, kd_row))
    if not args.quick:
        rows.append(run("student_kd_init", "student_kd.yaml", [*kd, "distill.student_init=every_other_layer"]))

    domains = list(rows[0]["eval"])
    print()
    print(f"{datetime.date.today()}, {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); runs in {study}")
    print("| run | layers | params | steps | " + " | ".join(domains) + " | mean eval loss | train tokens/s | wall (s) |")
    print("|---" * (len(domains) + 7) + "|")
    for r in rows:
        cells = [
            r["name"],
            str(r["layers"]),
            f"{r['params']:,}",
            str(r["steps"]),
            *(f"{r['eval'][d]:.3f}" for d in domains),
            f"**{r['mean']:.3f}**",
            f"{r['tok_s']:,.0f}",
            f"{r['wall_s']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print("claim: the distilled student reaches a lower mean eval loss than the student trained alone")
    for seed, (alone, kd_row) in enumerate(pairs):
        held = kd_row["mean"] < alone["mean"]
        wins = sum(kd_row["eval"][d] < alone["eval"][d] for d in domains)
        print(
            f"  seed {seed}: {'HELD' if held else 'DID NOT HOLD'} — {kd_row['mean']:.3f} vs {alone['mean']:.3f} "
            f"({kd_row['mean'] - alone['mean']:+.3f}); lower on {wins} of {len(domains)} domains"
        )
    return rows


if __name__ == "__main__":
    main()
