"""``jaxeff sparsify``: magnitude / Wanda pruning of a run into a new run folder (see docs/wanda.md).

    jaxeff sparsify --checkpoint runs/quickstart --out runs/qs_wanda50 --method wanda --sparsity 0.5
    jaxeff sparsify --checkpoint runs/quickstart --out runs/qs_wanda24 --method wanda --nm 2:4

No jax at module level: this module is imported for every ``jaxeff`` command.
"""

from __future__ import annotations

import json

from jaxeff.errors import ConfigError


def register(sub) -> None:
    s = sub.add_parser("sparsify", help="prune a run's block projections (magnitude or Wanda) into a new run")
    s.add_argument("--checkpoint", required=True, help="run folder (or its checkpoints folder) to prune")
    s.add_argument("--out", required=True, help="new run folder, e.g. runs/pruned")
    s.add_argument("--method", default="wanda", help="wanda | magnitude (default: wanda)")
    s.add_argument("--sparsity", default=None, help="share of each output unit's weights set to 0, in [0, 1)")
    s.add_argument("--nm", default=None, help="N:M pattern, e.g. 2:4 (keep N of every M consecutive inputs)")
    s.add_argument("--calib-batches", type=int, default=8,
                   help="training batches of the run's data section used for Wanda's activation norms")
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--no-eval", action="store_true", help="skip the eval loss before/after")
    s.set_defaults(handler=cmd_sparsify)


def cmd_sparsify(args) -> int:
    if (args.sparsity is None) == (args.nm is None):
        raise ConfigError("--sparsity / --nm: give exactly one (e.g. --sparsity 0.5 or --nm 2:4)")
    from jaxeff.prune.wanda import check_sparsity, parse_nm, sparsify_run

    sparsity = check_sparsity(args.sparsity, "--sparsity") if args.sparsity is not None else None
    nm = parse_nm(args.nm, "--nm") if args.nm is not None else None
    if args.method not in ("wanda", "magnitude"):
        raise ConfigError(f"--method: expected wanda or magnitude (got {args.method!r})")
    rec = sparsify_run(args.checkpoint, args.out, method=args.method, sparsity=sparsity, nm=nm,
                       calib_batches=args.calib_batches, step=args.step, evaluate=not args.no_eval)
    print(f"sparsity of the pruned kernels   {rec['pruned_sparsity']:.4f} "
          f"({len(rec['layers'])} block projections; embeddings, norms, lm_head untouched)")
    print(f"sparsity of the whole model      {rec['model_sparsity']:.4f}")
    for k in sorted(rec.get("eval_after", {})):
        if k.startswith("eval/loss"):
            print(f"{k:32s} {rec['eval_before'][k]:.4f} -> {rec['eval_after'][k]:.4f}")
    print(json.dumps({"saved": args.out, "method": rec["method"], "sparsity": rec["sparsity"], "nm": rec["nm"]}))
    return 0
