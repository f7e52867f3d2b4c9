"""Study: merging two fine-tuned experts (task arithmetic, TIES) vs each expert vs multi-task; negation.

1. pretrain a small base on four domains of the embedded synthetic corpus (``arithmetic, records,
   prose, code``, uniform mixture);
2. fine-tune it, from the base through ``train.init_from``, on ``arithmetic`` only (expert A), on
   ``code`` only (expert C), and on both (multi-task, weights 1:1) -- same steps, batch, lr for all
   three (so the multi-task run sees as many tokens as one expert, half as many as both together);
   ``--replay R`` gives every other domain weight R in these mixtures (target domains weigh 1);
3. merge the experts with ``jaxeff.edit`` recipes (``merge_runs``, the code behind ``jaxeff
   merge``): task arithmetic ``base + lam (tau_A + tau_C)`` for a few ``lam``, and TIES (top 20%,
   elected sign, disjoint mean) for a few ``lam``;
4. negation: ``base - lam tau_A`` (and ``base - tau_C``): the negated domain's loss should rise while
   the other domains hold;
5. evaluate every model on all four domains (same eval documents, per-token loss in nats) and print
   one table; each merged run folder also gets the eval scalars as a TensorBoard run.

The claims are checked and printed as held / did not hold, with the numbers:
* merge: the best task-arithmetic merge has a lower mean loss over {arithmetic, code} than either
  expert (each expert forgets the other domain), and how far it is from the multi-task model;
* negation: ``base - tau_A`` raises the arithmetic loss by at least 0.05 nats, and each other
  domain moves by less than a quarter of that rise.

TensorBoard: <run-dir>/{base,ft_arith,ft_code,multi,ta_*,ties_*,neg_*} (deleted and rewritten on every run).

    python experiments/study_merge.py --quick        # a few minutes on a 2-core CPU
    python experiments/study_merge.py                # quickstart-size model, longer
    tensorboard --logdir runs/merge_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

from _common import REPO, add_study_args, mixture, quick_overrides, study_dir, train_run, train_steps

DOMAINS = ("arithmetic", "records", "prose", "code")
A, C = "arithmetic", "code"
QUICK = quick_overrides(n_layers=2)


def config(args, name: str, steps: int, weights: dict[str, float], extra: list[str]):
    from jaxeff.config import load_config

    w = {d: weights.get(d, 0.0) for d in DOMAINS}
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        (QUICK if args.quick else [])
        + [
            f"name={name}",
            f"logging.run_dir={args.run_dir}",
            "logging.progress=false",
            *mixture(w),
            *train_steps(steps),
            "train.eval_batches=4",
            "optim.weight_decay=0.0",
            "optim.warmup_steps=10",
        ]
        + extra,
    )


def train(args, name, steps, weights, extra):
    run = train_run(config(args, name, steps, weights, extra))
    print(f"  trained {name:9s} {run.wall_s:5.0f}s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(p, "merge", "small model, few steps (a few minutes on a 2-core CPU)", owns_run_dir=True)
    p.add_argument("--base-steps", type=int, default=None)
    p.add_argument("--ft-steps", type=int, default=None)
    p.add_argument("--ft-lr", type=float, default=3e-4, help="learning rate of the experts and the multi-task run")
    p.add_argument("--replay", type=float, default=0.0, help="mixture weight of each other domain while fine-tuning (target domains weigh 1): replay")
    args = p.parse_args()
    args.run_dir = str(study_dir(args, tag=f"_replay{args.replay:g}" if args.replay else ""))
    args.base_steps = args.base_steps or (300 if args.quick else 800)
    args.ft_steps = args.ft_steps or (80 if args.quick else 300)
    lams_ta = (0.3, 0.5, 0.8, 1.0)
    lams_ties = (0.5, 1.0, 1.5)
    lams_neg = (0.25, 0.5, 1.0)

    import jax
    from tensorboardX import SummaryWriter

    from jaxeff.edit import recipe_from_dict
    from jaxeff.edit.runs import merge_runs
    from jaxeff.runs import load_model_params
    from jaxeff.train.inputs import build_data
    from jaxeff.train.loop import Trainer

    t0 = time.perf_counter()
    rd = Path(args.run_dir)
    print(
        f"merge study ({'quick' if args.quick else 'full'}): base {args.base_steps} steps on {', '.join(DOMAINS)}; "
        f"experts / multi-task {args.ft_steps} steps; runs in {rd}",
        flush=True,
    )
    ft = [f"optim.lr={args.ft_lr}", f"train.init_from={rd / 'base'}"]
    train(args, "base", args.base_steps, {d: 1.0 for d in DOMAINS}, ["optim.lr=3e-3"])
    rest = {d: args.replay for d in DOMAINS}
    train(args, "ft_arith", args.ft_steps, {**rest, A: 1.0}, ft)
    train(args, "ft_code", args.ft_steps, {**rest, C: 1.0}, ft)
    train(args, "multi", args.ft_steps, {**rest, A: 1.0, C: 1.0}, ft)

    def merge(name, raw):
        shutil.rmtree(rd / name, ignore_errors=True)
        merge_runs(recipe_from_dict({"base": str(rd / "base"), "out": str(rd / name), **raw}))
        return name

    merged = []
    for lam in lams_ta:
        merged.append(
            (
                f"task arithmetic lam={lam:g}",
                merge(f"ta_{lam:g}", {"models": {A: {"path": str(rd / "ft_arith"), "scale": lam}, C: {"path": str(rd / "ft_code"), "scale": lam}}}),
            )
        )
    for lam in lams_ties:
        experts = {A: {"path": str(rd / "ft_arith")}, C: {"path": str(rd / "ft_code")}}
        merged.append((f"TIES k=0.2 lam={lam:g}", merge(f"ties_{lam:g}", {"method": "ties", "ties": {"k": 0.2, "lam": lam}, "models": experts})))
    negs = []
    for lam in lams_neg:
        negs.append((f"base - {lam:g} tau_arith", merge(f"neg_arith_{lam:g}", {"models": {A: {"path": str(rd / "ft_arith"), "scale": -lam}}})))
    negs.append(("base - 1 tau_code", merge("neg_code_1", {"models": {C: {"path": str(rd / "ft_code"), "scale": -1.0}}})))
    print(f"  merged {len(merged) + len(negs)} models", flush=True)

    # evaluate everything with one trainer (same architecture, same eval documents)
    cfg = config(args, "eval", 1, {d: 1.0 for d in DOMAINS}, [])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    _, _, eval_sets = build_data(cfg.data, cfg.model.vocab_size)

    def evaluate(name):
        params = load_model_params(rd / name)[1]
        ev = trainer.evaluate(params, eval_sets, cfg.train.eval_batches)
        return {d: ev[f"eval/loss/{d}"] for d in DOMAINS}

    rows = {}
    # control for negation: a random direction with the norm of tau_arith (is any step that long harmful?)
    from jaxeff.edit import apply_vectors, task_vector

    base_p = load_model_params(rd / "base")[1]
    tau = task_vector(load_model_params(rd / "ft_arith")[1], base_p)
    leaves, tdef = jax.tree.flatten(tau)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    rand = jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    norm = lambda t: float(sum((x.astype("float32") ** 2).sum() for x in jax.tree.leaves(t)) ** 0.5)
    control = apply_vectors(base_p, [rand], [-norm(tau) / norm(rand)])
    ev = trainer.evaluate(control, eval_sets, cfg.train.eval_batches)
    control_row = {"run": "(not saved)", **{d: ev[f"eval/loss/{d}"] for d in DOMAINS}}
    for label, name in (
        [("base", "base"), ("expert arithmetic", "ft_arith"), ("expert code", "ft_code"), ("multi-task (arith+code)", "multi")] + merged + negs
    ):
        rows[label] = {"run": name, **evaluate(name)}
        if name not in ("base", "ft_arith", "ft_code", "multi"):
            with SummaryWriter(str(rd / name)) as w:
                for d in DOMAINS:
                    w.add_scalar(f"eval/loss/{d}", rows[label][d], 0)
                w.add_scalar("eval/loss", sum(rows[label][d] for d in DOMAINS) / len(DOMAINS), 0)

    rows["control: base - random (|tau_arith|)"] = control_row

    def pair(r):
        return (r[A] + r[C]) / 2

    lines = ["| model | arithmetic | code | records | prose | mean(arith, code) | mean(4) |", "|" + "---|" * 7]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r[A]:.4f} | {r[C]:.4f} | {r['records']:.4f} | {r['prose']:.4f} | {pair(r):.4f} | {sum(r[d] for d in DOMAINS) / 4:.4f} |"
        )
    table = "\n".join(lines)

    best_label = min((lab for lab, _ in merged if lab.startswith("task")), key=lambda lab: pair(rows[lab]))
    best_ties = min((lab for lab, _ in merged if lab.startswith("TIES")), key=lambda lab: pair(rows[lab]))
    ea, ec, mt = pair(rows["expert arithmetic"]), pair(rows["expert code"]), pair(rows["multi-task (arith+code)"])
    b = pair(rows[best_label])
    bt = pair(rows[best_ties])
    claims = [
        f"merge: best task arithmetic ({best_label}) mean(arith, code) {b:.4f} vs experts {ea:.4f} / {ec:.4f}: "
        f"{'held' if b < min(ea, ec) else 'did NOT hold'} (lower than both experts); vs base {pair(rows['base']):.4f}; "
        f"multi-task {mt:.4f} (merge - multi-task = {b - mt:+.4f})",
        f"merge: best TIES ({best_ties}) mean(arith, code) {bt:.4f}: {'held' if bt < min(ea, ec) else 'did NOT hold'} "
        f"(lower than both experts); TIES - best task arithmetic = {bt - b:+.4f}",
    ]
    base = rows["base"]
    for label, _ in negs + [("control: base - random (|tau_arith|)", None)]:
        target = C if "code" in label else A
        rise = rows[label][target] - base[target]
        others = {d: rows[label][d] - base[d] for d in DOMAINS if d != target}
        held = rise >= 0.05 and all(abs(v) < rise / 4 for v in others.values())
        claims.append(
            f"negation {label}: {target} {rise:+.4f} nats, others "
            + ", ".join(f"{d} {v:+.4f}" for d, v in others.items())
            + f": {'held' if held else 'did NOT hold'} (target rises >= 0.05, others move < 1/4 of it)"
        )
    cmd = (
        "python experiments/study_merge.py"
        + (" --quick" if args.quick else "")
        + f" --base-steps {args.base_steps} --ft-steps {args.ft_steps} --ft-lr {args.ft_lr:g}"
        + (f" --replay {args.replay:g}" if args.replay else "")
    )
    text = (
        f"{cmd}  ({datetime.date.today()}, {time.perf_counter() - t0:.0f} s, CPU)\n\n"
        f"eval loss per domain (nats/token), {cfg.train.eval_batches} eval batches per domain\n\n{table}\n\n" + "\n".join(f"- {c}" for c in claims) + "\n"
    )
    print("\n" + text)
    (rd / "results.md").write_text(text)
    (rd / "results.json").write_text(json.dumps({"rows": rows, "claims": claims}, indent=1))


if __name__ == "__main__":
    main()
