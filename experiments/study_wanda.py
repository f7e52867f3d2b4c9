"""Study: Wanda vs magnitude pruning at 50% unstructured and 2:4, on one trained model.

1. train a base model (configs/quickstart.yaml; ``--quick``: smaller and shorter) on the embedded
   synthetic corpus, or reuse one with ``--base RUN``;
2. prune its block projections (attn q/k/v/o, mlp gate/up/down; embeddings/lm_head and norms
   untouched) with magnitude and with Wanda (``--calib-batches`` training batches, sequential
   calibration as in the reference code), at 50% per output unit and at 2:4 -- each through
   :func:`jaxeff.prune.wanda.sparsify_run`, i.e. what ``jaxeff sparsify`` does, written as a run folder;
3. print one table: achieved sparsity (pruned kernels / whole model), eval loss per domain and mean,
   and whether Wanda's mean eval loss is lower than magnitude's at each pattern.

TensorBoard: <run-dir>/wanda_study[_quick]/{base, magnitude_50, wanda_50, magnitude_2of4, wanda_2of4, ...}:
the base's training curves, and for each pruned run ``eval/loss[/domain]`` and ``sparsity/*`` at
step 0. The study owns that folder: it is deleted and rewritten on every run (not with ``--base``).

    python experiments/study_wanda.py --quick        # a few minutes on a 2-core CPU
    python experiments/study_wanda.py                # quickstart size (+ 60%, 70%, 4:8 rows)
    tensorboard --logdir runs/wanda_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time

from _common import add_study_args, quick_overrides, study_dir, train_base

QUICK = quick_overrides()


def variants(quick: bool) -> list[tuple[str, dict]]:
    out = [
        ("magnitude_50", {"method": "magnitude", "sparsity": 0.5}),
        ("wanda_50", {"method": "wanda", "sparsity": 0.5}),
        ("magnitude_2of4", {"method": "magnitude", "nm": "2:4"}),
        ("wanda_2of4", {"method": "wanda", "nm": "2:4"}),
    ]
    if not quick:
        for s in (0.6, 0.7):
            out += [(f"magnitude_{int(s * 100)}", {"method": "magnitude", "sparsity": s}), (f"wanda_{int(s * 100)}", {"method": "wanda", "sparsity": s})]
        out += [("magnitude_4of8", {"method": "magnitude", "nm": "4:8"}), ("wanda_4of8", {"method": "wanda", "nm": "4:8"})]
    return out


def _saved_config(run):
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir

    ckpt = Checkpointer(find_checkpoint_dir(run), create=False)
    try:
        return ckpt.read_config()
    finally:
        ckpt.close()


def _model_cfg(run):
    from jaxeff.models import TransformerConfig

    return TransformerConfig(**_saved_config(run)["model"])


def _held_out(run, rows_per_domain: int = 2):
    """Token rows ``[domains * rows, seq]`` from the run's eval sets (not used for calibration)."""
    import numpy as np

    from jaxeff.config import from_dict
    from jaxeff.train.inputs import build_data

    cfg = from_dict(_saved_config(run))
    _, _, evals = build_data(cfg.data, cfg.model.vocab_size)
    return np.concatenate([a["inputs"][:rows_per_domain] for a in evals.values()])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "wanda", "small model, few steps")
    ap.add_argument("--base", default=None, help="prune this run instead of training a base")
    ap.add_argument("--steps", type=int, default=None, help="base training steps (default 300; --quick 200)")
    ap.add_argument("--calib-batches", type=int, default=8)
    args = ap.parse_args(argv)

    import jax
    from tensorboardX import SummaryWriter

    import numpy as np

    from jaxeff.models import Transformer
    from jaxeff.prune.wanda import output_error, sparsify_run

    study = study_dir(args)
    base = train_base(args, study, QUICK if args.quick else [], args.steps or (200 if args.quick else 300))

    rows, dense, held_out, model = [], None, None, None
    for name, kw in variants(args.quick):
        shutil.rmtree(study / name, ignore_errors=True)
        t0 = time.perf_counter()
        rec, dense_params, pruned = sparsify_run(base, study / name, calib_batches=args.calib_batches, return_params=True, **kw)
        rec["name"], rec["wall_s"] = name, time.perf_counter() - t0
        if held_out is None:
            held_out, model = _held_out(base), None
        model = model or Transformer(_model_cfg(base))
        rec["output_error"] = float(np.mean(list(output_error(model, dense_params, pruned, held_out).values())))
        dense = dense or rec["eval_before"]
        with SummaryWriter(str(study / name)) as w:
            for k, v in rec["eval_after"].items():
                w.add_scalar(k, v, 0)
            w.add_scalar("sparsity/pruned_kernels", rec["pruned_sparsity"], 0)
            w.add_scalar("sparsity/model", rec["model_sparsity"], 0)
            w.add_scalar("prune/relative_output_error", rec["output_error"], 0)
        print(
            f"  {name:15s} {rec['wall_s']:5.0f}s  sparsity {rec['pruned_sparsity']:.3f}  "
            f"output error {rec['output_error']:.4f}  eval loss {rec['eval_after']['eval/loss']:.4f}",
            flush=True,
        )
        rows.append(rec)

    domains = sorted(k.split("/")[-1] for k in dense if k.startswith("eval/loss/"))
    print()
    print(
        f"{datetime.date.today()}, {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); base {base}; "
        f"Wanda calibration: {args.calib_batches} training batches"
    )
    print("| run | pattern | sparsity (pruned kernels) | sparsity (whole model) | rel. output error | " + " | ".join(domains) + " | mean eval loss |")
    print("|---" * (len(domains) + 6) + "|")
    print("| dense | - | 0 | 0 | 0 | " + " | ".join(f"{dense[f'eval/loss/{d}']:.3f}" for d in domains) + f" | **{dense['eval/loss']:.3f}** |")
    for r in rows:
        pattern = r["nm"] or f"{r['sparsity']:.0%}"
        print(
            f"| {r['name']} | {pattern} | {r['pruned_sparsity']:.3f} | {r['model_sparsity']:.3f} | "
            f"{r['output_error']:.3f} | "
            + " | ".join(f"{r['eval_after'][f'eval/loss/{d}']:.3f}" for d in domains)
            + f" | **{r['eval_after']['eval/loss']:.3f}** |"
        )
    print()
    print(
        "rel. output error: ||X (W - W_pruned)|| / ||X W|| of each pruned layer on its dense-model inputs X for one "
        "held-out batch per domain, averaged over the layers"
    )
    print("claim: Wanda reaches a lower mean eval loss than magnitude pruning at the same pattern")
    by = {r["name"]: r for r in rows}
    for name in by:
        if not name.startswith("wanda_"):
            continue
        w, m = by[name], by["magnitude_" + name[len("wanda_") :]]
        lw, lm = w["eval_after"]["eval/loss"], m["eval_after"]["eval/loss"]
        wins = sum(w["eval_after"][f"eval/loss/{d}"] < m["eval_after"][f"eval/loss/{d}"] for d in domains)
        verdict = "NO DIFFERENCE (|diff| < 0.005)" if abs(lw - lm) < 0.005 else "HELD" if lw < lm else "DID NOT HOLD"
        print(
            f"  {name[len('wanda_') :]:6s}: {verdict} -- wanda {lw:.3f} vs magnitude "
            f"{lm:.3f} ({lw - lm:+.3f}; dense {dense['eval/loss']:.3f}); lower on {wins} of {len(domains)} domains"
        )
    return rows


if __name__ == "__main__":
    main()
