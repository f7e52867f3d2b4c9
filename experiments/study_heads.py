"""Study: how many attention heads can go at test time (Michel et al. 2019), importance vs random order.

1. train a base model on the embedded synthetic corpus (configs/quickstart.yaml with more, smaller
   heads; ``--quick``: a tiny model, a few hundred steps), or reuse one with ``--base RUN``;
2. prune its heads iteratively (:func:`jaxeff.prune.heads.iterative_prune`, what ``jaxeff prune-heads``
   does): in steps of 1/8 of all heads, by importance ``E_x|dL/dξ_h|`` (recomputed each step with the
   pruned heads gated off, l2-normalised per layer) and in ``--random-seeds`` random orders; the
   eval loss (the run's eval sets) after every step; also with the raw (not per-layer normalised)
   scores, with ``--balance group`` (one head out of every kv group per step: importance and random),
   and the rank correlation of the score with the loss increase of removing each head alone;
3. extract the importance-pruned model at the largest share within ``--tolerance`` of the unpruned
   loss with ``jaxeff prune-heads``' code (:func:`~jaxeff.prune.heads.prune_heads_run`) and check its
   loss;
4. print one table (share pruned -> loss, importance vs random mean/min/max) and the verdict on the
   paper's three claims: a large share of heads can go with little loss; the curve breaks past some
   point; importance order beats random order.

TensorBoard: <run-dir>/heads_study[_quick]/{base, importance, importance_raw, random_<seed>, importance_group,
random_group}: ``heads/eval_loss`` and
``heads/loss_increase`` at x = heads pruned. The study owns that folder (deleted and rewritten unless
``--base``).

    python experiments/study_heads.py --quick        # ~3 minutes on a 2-core CPU
    python experiments/study_heads.py                # quickstart width, 4 layers x 8 heads, 1000 steps
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time

from _common import add_study_args, quick_overrides, study_dir, train_base

# 4 layers x 8 query heads (2 kv heads, groups of 4): 32 heads, head_dim 8 (quick) / 16
FULL = ["model.n_heads=8", "model.n_kv_heads=2"]
QUICK = quick_overrides() + FULL


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "heads", "tiny model, few steps")
    ap.add_argument("--base", default=None, help="prune this run instead of training a base")
    ap.add_argument("--steps", type=int, default=None, help="base training steps (default 1000; --quick 600)")
    ap.add_argument("--batches", type=int, default=4, help="training batches for the importance scores")
    ap.add_argument("--random-seeds", type=int, default=3, help="random head orders to average")
    ap.add_argument("--tolerance", type=float, default=0.05, help="'little loss': eval loss at most this many nats above the unpruned model's")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.models import Transformer
    from jaxeff.prune.heads import HeadScorer, ablation_increase, iterative_prune, prune_heads_run, run_batches, spearman
    from jaxeff.runs import lm_run_config, load_model_params, read_config

    study = study_dir(args)
    base = train_base(args, study, QUICK if args.quick else FULL, args.steps or (600 if args.quick else 1000))

    cfg, params = load_model_params(base)
    data_cfg = lm_run_config(read_config(base), study / "_data")
    imp_batches, evals = run_batches(data_cfg, args.batches)
    scorer = HeadScorer(Transformer(cfg.model), params)
    L, H = cfg.model.n_layers, cfg.model.n_heads
    total = L * H
    fraction, step_fraction = 7 / 8, 1 / 8

    t0 = time.perf_counter()
    curves = {}
    _, curves["importance"] = iterative_prune(scorer, (L, H), imp_batches, evals, fraction=fraction, step_fraction=step_fraction, order="importance")
    _, curves["importance_raw"] = iterative_prune(
        scorer, (L, H), imp_batches, evals, fraction=fraction, step_fraction=step_fraction, order="importance", normalize=False
    )
    for order in ("importance", "random"):  # the same count out of every kv group (no padding on extraction)
        _, curves[f"{order}_group"] = iterative_prune(
            scorer, (L, H), imp_batches, evals, fraction=fraction, order=order, balance="group", kv_heads=cfg.model.n_kv_heads
        )
    for seed in range(args.random_seeds):
        _, curves[f"random_{seed}"] = iterative_prune(
            scorer, (L, H), imp_batches, evals, fraction=fraction, step_fraction=step_fraction, order="random", seed=seed
        )
    print(f"pruning curves: {time.perf_counter() - t0:.0f} s", flush=True)
    base_loss = curves["importance"][0]["loss"]
    for name, hist in curves.items():
        shutil.rmtree(study / name, ignore_errors=True)
        with SummaryWriter(str(study / name)) as w:
            for h in hist:
                w.add_scalar("heads/eval_loss", h["loss"], h["pruned"])
                w.add_scalar("heads/loss_increase", h["loss"] - base_loss, h["pruned"])

    # how well the one-pass score predicts removing each head alone
    ones = np.ones((L, H), np.float32)
    ablation = ablation_increase(scorer, (L, H), evals)
    rho_norm = spearman(scorer.importance(ones, imp_batches), ablation)
    rho_raw = spearman(scorer.importance(ones, imp_batches, normalize=False), ablation)

    imp = np.array([h["loss"] for h in curves["importance"]])
    raw = np.array([h["loss"] for h in curves["importance_raw"]])
    rnd = np.array([[h["loss"] for h in hist] for name, hist in curves.items() if name.startswith("random_") and not name.endswith("_group")])
    group = {h["pruned"]: (h["loss"], r["loss"]) for h, r in zip(curves["importance_group"], curves["random_group"])}
    pruned = [h["pruned"] for h in curves["importance"]]
    print()
    print(
        f"{datetime.date.today()}, {jax.devices()[0].device_kind}; base {base} ({L} layers x {H} heads, "
        f"{cfg.model.kv_heads} kv heads per layer); importance from {args.batches} training batches; "
        f"eval loss over {len(evals)} eval batches; random: {len(rnd)} seeds"
    )
    print(
        "| heads pruned | share | importance order | importance, not normalised | random order (mean) | "
        "random (min..max) | importance - random | per-group importance | per-group random |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, n in enumerate(pruned):
        gi, gr = (f"{group[n][0]:.4f}", f"{group[n][1]:.4f}") if n in group else ("", "")
        print(
            f"| {n}/{total} | {n / total:.3f} | {imp[i]:.4f} | {raw[i]:.4f} | {rnd[:, i].mean():.4f} | "
            f"{rnd[:, i].min():.4f}..{rnd[:, i].max():.4f} | {imp[i] - rnd[:, i].mean():+.4f} | {gi} | {gr} |"
        )
    print()
    print(
        f"single-head ablation: loss increase {ablation.min():+.4f}..{ablation.max():+.4f} nats "
        f"(median {np.median(ablation):+.4f}); {int((ablation <= 0).sum())}/{total} heads lower the loss when removed alone; "
        f"Spearman rank correlation with the importance score: {rho_norm:.3f} (l2-normalised per layer), "
        f"{rho_raw:.3f} (raw)"
    )

    # the claims, for the paper's per-layer normalised score and for the raw score
    rnd_mean = rnd.mean(0)

    def within(curve):  # index of the last step still within the tolerance (0 = unpruned)
        return max(i for i in range(len(curve)) if curve[i] - curve[0] <= args.tolerance)

    print()
    print(f"random order: {pruned[within(rnd_mean)]}/{total} heads within +{args.tolerance} nats (mean of the seeds)")
    for label, curve in (("importance, l2-normalised per layer (the paper's)", imp), ("importance, raw", raw)):
        k = within(curve)
        print(f"{label}:")
        print(
            f"  claim 1, a large share of heads can go with little loss (<= +{args.tolerance} nats): "
            f"{'HELD' if pruned[k] / total >= 0.25 else 'DID NOT HOLD'} -- {pruned[k]}/{total} heads "
            f"({pruned[k] / total:.0%}) at {curve[k]:.4f} vs {curve[0]:.4f} unpruned; 'large' taken as >= 25%"
        )
        steps_inc = np.diff(curve)
        if k + 1 >= len(curve):
            print(f"  claim 2, the curve breaks past some point: NOT REACHED -- within +{args.tolerance} at {pruned[-1] / total:.0%} pruned")
        elif k == 0:
            print(
                f"  claim 2, the curve breaks past some point: NO FLAT PART -- +{steps_inc[0]:.4f} nats already at the "
                f"first step ({pruned[1]}/{total} heads), then {steps_inc[1:].mean():+.4f} per step"
            )
        else:
            before, after = steps_inc[:k].mean(), steps_inc[k:].mean()
            print(
                f"  claim 2, the curve breaks past some point: {'HELD' if after > 3 * max(before, 1e-4) else 'DID NOT HOLD'}"
                f" -- {before:+.4f} nats per step up to {pruned[k] / total:.0%} pruned, {after:+.4f} per step after"
            )
        wins = int(np.sum(curve[1:] < rnd_mean[1:]))
        a_c, a_r = float(np.mean(curve[1:] - curve[0])), float(np.mean(rnd_mean[1:] - curve[0]))
        held = wins > (len(pruned) - 1) / 2 and a_c < a_r
        print(
            f"  claim 3, importance order beats random order: {'HELD' if held else 'DID NOT HOLD'} -- lower than the "
            f"random mean at {wins} of {len(pruned) - 1} steps; mean increase {a_c:+.4f} vs {a_r:+.4f} nats (random)"
        )
    # extraction through the CLI's code path: the global order (raw or normalised, the better one) at its
    # largest share within the tolerance (at least one step), and the per-group order at one head per group
    use_raw = within(raw) >= within(imp)
    k = max(within(raw if use_raw else imp), 1)
    g_size = H // cfg.model.kv_heads
    for label, share, kw in (
        (f"global_{pruned[k]}of{total}{'_raw' if use_raw else ''}", pruned[k] / total, {"normalize": not use_raw}),
        (f"group_{total // g_size}of{total}", 1 / g_size, {"balance": "group"}),
    ):
        out = study / f"extracted_{label}"
        shutil.rmtree(out, ignore_errors=True)
        rec = prune_heads_run(base, out, fraction=share, batches=args.batches, step_fraction=step_fraction, **kw)
        print(
            f"extracted ({out.name}): {rec['n_heads']} query / {rec['n_kv_heads']} kv heads per layer, kept per "
            f"layer {rec['kept_heads_per_layer']}, {rec['padding_heads']} zero padding heads; {rec['params_before']} "
            f"-> {rec['params_after']} parameters; eval loss {rec['extracted_loss']:.4f} "
            f"(gated: {rec['history'][-1]['loss']:.4f})"
        )
    shutil.rmtree(study / "_data", ignore_errors=True)
    return curves


if __name__ == "__main__":
    main()
