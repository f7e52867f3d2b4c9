"""``jaxeff prune-heads``: Michel et al. (2019) head-importance pruning of a run into a smaller run.

    jaxeff prune-heads runs/quickstart --fraction 0.5 --out runs/qs_heads50
    jaxeff prune-heads runs/quickstart --fraction 0.5 --out runs/qs_rand50 --order random --seed 1

No jax at module level: this module is imported for every ``jaxeff`` command. See docs/heads.md.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("prune-heads", help="prune the least important attention heads of a run (Michel et al. 2019) "
                                           "into a smaller dense run")
    p.add_argument("run", help="run folder (or its checkpoints folder); any method")
    p.add_argument("--fraction", required=True, help="share of all attention heads to prune, in [0, 1)")
    p.add_argument("--out", required=True, help="new run folder, e.g. runs/heads50")
    p.add_argument("--order", default="importance", help="importance (default) | random")
    p.add_argument("--batches", type=int, default=4,
                   help="training batches of the run's data section for the importance scores (default 4)")
    p.add_argument("--step-fraction", type=float, default=0.1,
                   help="share of all heads pruned per iteration; importance recomputed each time (default 0.1)")
    p.add_argument("--balance", default="global",
                   help="global (default, the paper: heads anywhere; layers that keep fewer are zero-padded on "
                        "extraction) | group (the same number out of every kv group of every layer: a smaller model "
                        "without padding)")
    p.add_argument("--no-normalize", action="store_true",
                   help="rank the raw scores instead of l2-normalising them per layer (the paper's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(handler=cmd_prune_heads)


def cmd_prune_heads(args) -> int:
    from jaxeff.prune.heads import check_fraction, prune_heads_run

    rec = prune_heads_run(args.run, args.out, fraction=check_fraction(args.fraction), order=args.order,
                          batches=args.batches, step_fraction=args.step_fraction, seed=args.seed, step=args.step,
                          normalize=not args.no_normalize, balance=args.balance)
    print("| heads pruned | share | eval loss (gated) |")
    print("|---|---|---|")
    for h in rec["history"]:
        print(f"| {h['pruned']} | {h['fraction']:.3f} | {h['loss']:.4f} |")
    print(f"extracted model: {rec['n_heads']} query heads / {rec['n_kv_heads']} kv heads per layer "
          f"(kept per layer {rec['kept_heads_per_layer']}, {rec['padding_heads']} zero padding heads); "
          f"{rec['params_before']} -> {rec['params_after']} parameters; eval loss {rec['extracted_loss']:.4f}")
    print(json.dumps({"saved": args.out, "fraction": rec["fraction"], "order": rec["order"]}))
    return 0
