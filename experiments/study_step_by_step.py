"""Study: distilling step-by-step (Hsieh et al. 2023) -- answer accuracy vs training-set size, label-only vs step-by-step.

For each training-set size N (addition problems with 1-3 digit operands, jaxeff.data.synthetic.arithmetic_additions):

1. ``jaxeff distill-rationales`` writes the data of configs/distill/step_by_step.yaml twice: labels only
   (``[label] a+b=c``; ``rationale_source=none``: standard fine-tuning) and labels + rationales
   (``[rationale] a+b=<carry steps>``; ``rationale_source=generator``: the controlled setting of the
   issue, exact rationales). With ``--teacher``, a third variant takes the rationales from a teacher run:
   a step_by_step model trained first on ``--teacher-problems`` problems with the generator's
   rationales, whose greedy ``[rationale] a+b=`` continuations (right or wrong) become the data;
2. trains one model per (N, variant) from scratch: same model, steps, batch, sequence length,
   optimizer and seed (equal compute per run; label-only sees twice the label lines per step, as the
   paper's standard fine-tuning would), loss = L_label + λ·L_rationale (λ = 1; label-only: L_label);
3. answer accuracy with the ``arithmetic_accuracy`` metric of ``jaxeff eval`` (evals.evaluate_run):
   ``--problems`` fresh generator problems asked ``[label] a+b=``, greedy, exact match; no rationale at
   test time (the paper's setting: the rationale is a training signal only);
4. prints one table and the verdict on the claim: step-by-step reaches the label-only accuracy
   with less data -- judged per size against 2 standard errors (binomial, unpaired: conservative) and
   by the smallest N at which each variant reaches the label-only model's best accuracy. ``--control``
   adds λ = 0 on the step-by-step data: its label lines at step-by-step's rate, no rationale gradient
   (label-only sees twice the label lines per step), so what the rationale loss itself adds shows.

TensorBoard: <run-dir>/step_by_step_study[_quick]/n<N>_<variant>: each run's training curves
(``train/label_ce``, ``train/rationale_ce``) and ``sbs/arithmetic_accuracy`` at the last step. The study owns
that folder: it is deleted and rewritten on every run.

    python experiments/study_step_by_step.py --quick        # 2 sizes x 2 variants, tiny model (~9 minutes on a busy 2-core CPU)
    python experiments/study_step_by_step.py                # 4 sizes, the config's model
    python experiments/study_step_by_step.py --teacher      # + teacher-written rationales
"""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import time

from _common import REPO, add_study_args, quick_data, quick_model, study_dir, train_run, train_steps

CONFIG = REPO / "configs" / "distill" / "step_by_step.yaml"
QUICK = quick_model(n_layers=3) + quick_data(docs_per_domain=None, eval_batches=1)  # the corpus: --sizes problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "step_by_step", "tiny model, 2 sizes, few steps")
    ap.add_argument("--sizes", default=None, help="training-set sizes, comma separated (default 250,1000,4000,16000; --quick 300,3000)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 1500; --quick 400)")
    ap.add_argument("--problems", type=int, default=500, help="fresh problems for the accuracy")
    ap.add_argument("--weight", type=float, default=1.0, help="λ, the rationale loss weight")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (initialisation); problems and batch order stay")
    ap.add_argument("--digits", type=int, default=None, help="operand digits (default 3; --quick 2)")
    ap.add_argument("--teacher", action="store_true", help="add the teacher-written-rationales variant")
    ap.add_argument(
        "--control",
        action="store_true",
        help="add λ = 0 on the step-by-step data (the label lines of step-by-step at the same rate, no rationale gradient)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="run only these variants, comma separated (none, generator, control, teacher): e.g. to add a variant in another process",
    )
    ap.add_argument("--teacher-problems", type=int, default=None, help="the teacher's training set (default: the largest size)")
    args = ap.parse_args(argv)

    import jax
    from tensorboardX import SummaryWriter

    from jaxeff.config import load_config
    from jaxeff.distill.step_by_step import write_data
    from jaxeff.evals import evaluate_run

    study = study_dir(args)
    shutil.rmtree(study, ignore_errors=True)
    sizes = [int(s) for s in (args.sizes or ("300,3000" if args.quick else "250,1000,4000,16000")).split(",")]
    steps = args.steps or (400 if args.quick else 1500)
    common = [
        f"logging.run_dir={study}",
        "logging.progress=false",
        f"seed={args.seed}",
        *train_steps(steps),
        f"step_by_step.rationale_weight={args.weight}",
        f"step_by_step.digits={args.digits or (2 if args.quick else 3)}",
        *(QUICK if args.quick else []),
    ]

    def run(name, n, source, extra=(), variant=None):
        data = study / "data" / name
        overrides = [
            f"name={name}",
            *common,
            f"step_by_step.problems={n}",
            f"step_by_step.rationale_source={source}",
            f"data.paths=[{data / 'train.jsonl'}]",
            f"data.eval_paths=[{data / 'eval.jsonl'}]",
            *extra,
        ]
        cfg = load_config(CONFIG, overrides)
        t0 = time.perf_counter()
        rec = write_data(cfg)
        t_data = time.perf_counter() - t0
        _, result, wall = train_run(cfg, fresh=False)  # (the study folder is new)
        acc = evaluate_run(cfg.run_path, ["arithmetic_accuracy"], losses=False, examples=args.problems)
        row = {
            "name": name,
            "n": n,
            "variant": variant or source,
            "acc": acc["arithmetic_accuracy"],
            "problems": acc["arithmetic_problems"],
            "eval_loss": result.get("eval/loss", float("nan")),
            "label_ce": result.get("train/label_ce", float("nan")),
            "rationale_ce": result.get("train/rationale_ce", float("nan")),
            "wall": wall,
            "data_wall": t_data,
            "teacher_exact": rec.get("teacher_rationales_exact"),
        }
        with SummaryWriter(str(cfg.run_path)) as w:
            w.add_scalar("sbs/arithmetic_accuracy", row["acc"], steps)
        print(f"{name}: {steps} steps in {wall:.0f} s, accuracy {row['acc']:.3f}", flush=True)
        return row

    wanted = (
        set(args.only.split(",")) if args.only else {"none", "generator", *(["control"] if args.control else []), *(["teacher"] if args.teacher else [])}
    )
    teacher_extra = []
    rows = []
    if "teacher" in wanted:
        tn = args.teacher_problems or max(sizes)
        t_row = run("teacher", tn, "generator")
        rows.append(t_row)
        teacher_extra = [f"step_by_step.teacher_checkpoint={study / 'teacher'}"]
    for n in sizes:
        if "none" in wanted:
            rows.append(run(f"n{n}_label_only", n, "none"))
        if "generator" in wanted:
            rows.append(run(f"n{n}_step_by_step", n, "generator"))
        if "control" in wanted:
            rows.append(run(f"n{n}_lambda0", n, "generator", ["step_by_step.rationale_weight=0"], variant="control"))
        if "teacher" in wanted:
            rows.append(run(f"n{n}_sbs_teacher", n, "teacher", teacher_extra))

    cfg = load_config(CONFIG, common)
    from jaxeff.data.synthetic import arithmetic_additions
    from jaxeff.evals import FRESH_SEED_OFFSET

    test = {
        p["question"] for p in arithmetic_additions(args.problems, cfg.data.seed + FRESH_SEED_OFFSET, digits=cfg.step_by_step.digits)
    }  # what the metric asks (seed 0)
    for n in sorted({r["n"] for r in rows}):
        train = {p["question"] for p in arithmetic_additions(n, cfg.data.seed, digits=cfg.step_by_step.digits)}
        print(
            f"N = {n}: {len(train)} distinct problems; {len(train & test)} of the {len(test)} distinct test problems "
            "are among them (memorisation counts there)"
        )
    print()
    print(
        f"{datetime.date.today()}, {jax.devices()[0].device_kind}; runs in {study}; model d_model={cfg.model.d_model} "
        f"x {cfg.model.n_layers} layers; every run {steps} steps x {cfg.data.batch_size} rows x {cfg.data.seq_len} tokens "
        f"(equal compute); λ = {args.weight}; accuracy: greedy exact answers to {args.problems} fresh problems "
        f"(1-{cfg.step_by_step.digits} digit operands), no rationale at test time"
    )
    print("| training problems | variant | answer accuracy | ± s.e. | train label CE | train rationale CE | eval loss | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")

    def se(p, k):
        return math.sqrt(max(p * (1 - p), 1e-12) / k)

    for r in rows:
        variant = {
            "none": "label-only",
            "generator": "step-by-step (generator rationales)",
            "control": "λ = 0 on the step-by-step data",
            "teacher": f"step-by-step (teacher rationales, {r['teacher_exact']:.0%} exact)"
            if r["teacher_exact"] is not None
            else "step-by-step (teacher)",
        }[r["variant"]]
        if r["name"] == "teacher":
            variant = "teacher (step-by-step)"
        print(
            f"| {r['n']} | {variant} | **{r['acc']:.3f}** | {se(r['acc'], r['problems']):.3f} | {r['label_ce']:.3f} | "
            f"{r['rationale_ce']:.3f} | {r['eval_loss']:.3f} | {r['wall']:.0f} |"
        )

    by = {(r["n"], r["variant"]): r for r in rows if r["name"] != "teacher"}
    print()
    if not {"none", "generator"} <= wanted:
        return rows
    wins, losses, ties = [], [], []
    for n in sizes:
        a, b = by[(n, "generator")], by[(n, "none")]
        d = a["acc"] - b["acc"]
        s = math.sqrt(se(a["acc"], a["problems"]) ** 2 + se(b["acc"], b["problems"]) ** 2)
        (wins if d > 2 * s else losses if d < -2 * s else ties).append(n)
        print(f"  N = {n}: step-by-step {a['acc']:.3f} vs label-only {b['acc']:.3f}: {d:+.3f} ± {s:.3f} (1 s.e.)")
    best_label = max(by[(n, "none")]["acc"] for n in sizes)
    reach = {v: next((n for n in sizes if by[(n, v)]["acc"] >= best_label), None) for v in ("none", "generator")}
    verdict = "DID NOT HOLD" if losses else "HELD" if wins else "NOT RESOLVED (every size within 2 s.e.)"
    print(
        f"claim (Hsieh et al.): step-by-step needs less training data than label-only training for the same answer "
        f"accuracy: {verdict} -- better beyond 2 s.e. at N = {wins or 'none'}, worse at N = {losses or 'none'}, "
        f"within 2 s.e. at N = {ties or 'none'}; the label-only best accuracy {best_label:.3f} is reached at N = "
        f"{reach['none']} by label-only and at N = {reach['generator'] or 'none of the sizes'} by step-by-step"
    )
    if "control" in wanted:
        for n in sizes:
            a, c = by[(n, "generator")], by[(n, "control")]
            s = math.sqrt(se(a["acc"], a["problems"]) ** 2 + se(c["acc"], c["problems"]) ** 2)
            print(
                f"  equal label lines per step (N = {n}): step-by-step {a['acc']:.3f} vs λ = 0 {c['acc']:.3f}: "
                f"{a['acc'] - c['acc']:+.3f} ± {s:.3f} -- what the rationale loss itself adds"
            )
    if "teacher" in wanted:
        for n in sizes:
            t = by[(n, "teacher")]
            print(
                f"  teacher rationales (N = {n}, {t['teacher_exact']:.0%} exactly right): accuracy {t['acc']:.3f} vs "
                f"generator rationales {by[(n, 'generator')]['acc']:.3f}, label-only {by[(n, 'none')]['acc']:.3f}"
            )
    print("  one seed per cell: the s.e. is over the test problems only, not over training runs")
    return rows


if __name__ == "__main__":
    main()
