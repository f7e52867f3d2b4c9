"""The pruning family's verbs (registered into ``jaxeff``'s parser by :mod:`jaxeff.cli`, ``FAMILY_CLIS``):

    jaxeff extract --checkpoint runs/shear --out runs/sheared          # a shear run's pruned model (docs/prune.md)
    jaxeff sparsify --checkpoint runs/quickstart --out runs/qs_wanda50 --method wanda --sparsity 0.5   (docs/wanda.md)
    jaxeff sparsify --checkpoint runs/quickstart --out runs/qs_wanda24 --method wanda --nm 2:4
    jaxeff prune-heads runs/quickstart --fraction 0.5 --out runs/qs_heads50                            (docs/heads.md)

No jax at module level: this module is imported for every ``jaxeff`` command.
"""

from __future__ import annotations

import json

from jaxeff.errors import ConfigError


def register(sub) -> None:
    _register_shear(sub)
    _register_wanda(sub)
    _register_heads(sub)


# ----------------------------------------------------------------------------------------------
# extract (Sheared-LLaMA)


def _register_shear(sub) -> None:
    x = sub.add_parser("extract", help="write the pruned model of a shear run as a smaller dense run")
    x.add_argument("--checkpoint", required=True, help="a shear run folder (or its checkpoints folder)")
    x.add_argument("--out", required=True, help="new run folder, e.g. runs/sheared")
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    x.set_defaults(handler=cmd_extract)


def cmd_extract(args) -> int:
    from jaxeff.prune.extract import extract_run
    from jaxeff.runs import read_config

    out = extract_run(args.checkpoint, args.out, args.step)
    model = read_config(out)["model"]
    print(f"extracted model saved as run {out}; its model section (for train.init_from={out}):")
    print(json.dumps({"model": model}))
    changed = {
        k: v for k, v in model.items() if k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "sliding_window") and v is not None
    }
    print("as overrides of the source config: " + " ".join(f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in changed.items()))
    return 0


# ----------------------------------------------------------------------------------------------
# sparsify (Wanda / magnitude)


def _register_wanda(sub) -> None:
    s = sub.add_parser("sparsify", help="prune a run's block projections (magnitude or Wanda) into a new run")
    s.add_argument("--checkpoint", required=True, help="run folder (or its checkpoints folder) to prune")
    s.add_argument("--out", required=True, help="new run folder, e.g. runs/pruned")
    s.add_argument("--method", default="wanda", help="wanda | magnitude (default: wanda)")
    s.add_argument("--sparsity", default=None, help="share of each output unit's weights set to 0, in [0, 1)")
    s.add_argument("--nm", default=None, help="N:M pattern, e.g. 2:4 (keep N of every M consecutive inputs)")
    s.add_argument("--calib-batches", type=int, default=8, help="training batches of the run's data section used for Wanda's activation norms")
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
    rec = sparsify_run(
        args.checkpoint,
        args.out,
        method=args.method,
        sparsity=sparsity,
        nm=nm,
        calib_batches=args.calib_batches,
        step=args.step,
        evaluate=not args.no_eval,
    )
    print(f"sparsity of the pruned kernels   {rec['pruned_sparsity']:.4f} ({len(rec['layers'])} block projections; embeddings, norms, lm_head untouched)")
    print(f"sparsity of the whole model      {rec['model_sparsity']:.4f}")
    for k in sorted(rec.get("eval_after", {})):
        if k.startswith("eval/loss"):
            print(f"{k:32s} {rec['eval_before'][k]:.4f} -> {rec['eval_after'][k]:.4f}")
    print(json.dumps({"saved": args.out, "method": rec["method"], "sparsity": rec["sparsity"], "nm": rec["nm"]}))
    return 0


# ----------------------------------------------------------------------------------------------
# prune-heads (Michel et al. 2019)


def _register_heads(sub) -> None:
    p = sub.add_parser("prune-heads", help="prune the least important attention heads of a run (Michel et al. 2019) into a smaller dense run")
    p.add_argument("run", help="run folder (or its checkpoints folder); any method")
    p.add_argument("--fraction", required=True, help="share of all attention heads to prune, in [0, 1)")
    p.add_argument("--out", required=True, help="new run folder, e.g. runs/heads50")
    p.add_argument("--order", default="importance", help="importance (default) | random")
    p.add_argument("--batches", type=int, default=4, help="training batches of the run's data section for the importance scores (default 4)")
    p.add_argument(
        "--step-fraction", type=float, default=0.1, help="share of all heads pruned per iteration; importance recomputed each time (default 0.1)"
    )
    p.add_argument(
        "--balance",
        default="global",
        help="global (default, the paper: heads anywhere; layers that keep fewer are zero-padded on "
        "extraction) | group (the same number out of every kv group of every layer: a smaller model "
        "without padding)",
    )
    p.add_argument("--no-normalize", action="store_true", help="rank the raw scores instead of l2-normalising them per layer (the paper's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(handler=cmd_prune_heads)


def cmd_prune_heads(args) -> int:
    from jaxeff.prune.heads import check_fraction, prune_heads_run

    rec = prune_heads_run(
        args.run,
        args.out,
        fraction=check_fraction(args.fraction),
        order=args.order,
        batches=args.batches,
        step_fraction=args.step_fraction,
        seed=args.seed,
        step=args.step,
        normalize=not args.no_normalize,
        balance=args.balance,
    )
    print("| heads pruned | share | eval loss (gated) |")
    print("|---|---|---|")
    for h in rec["history"]:
        print(f"| {h['pruned']} | {h['fraction']:.3f} | {h['loss']:.4f} |")
    print(
        f"extracted model: {rec['n_heads']} query heads / {rec['n_kv_heads']} kv heads per layer "
        f"(kept per layer {rec['kept_heads_per_layer']}, {rec['padding_heads']} zero padding heads); "
        f"{rec['params_before']} -> {rec['params_after']} parameters; eval loss {rec['extracted_loss']:.4f}"
    )
    print(json.dumps({"saved": args.out, "fraction": rec["fraction"], "order": rec["order"]}))
    return 0
