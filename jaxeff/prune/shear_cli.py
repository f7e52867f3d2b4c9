"""``jaxeff extract``: the pruned model of a ``shear`` run as a new, smaller run folder.

Registered into ``jaxeff``'s parser by :mod:`jaxeff.cli` (``FAMILY_CLIS``); no jax at import.
"""

from __future__ import annotations


def register(sub) -> None:
    x = sub.add_parser("extract", help="write the pruned model of a shear run as a smaller dense run")
    x.add_argument("--checkpoint", required=True, help="a shear run folder (or its checkpoints folder)")
    x.add_argument("--out", required=True, help="new run folder, e.g. runs/sheared")
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    x.set_defaults(handler=cmd_extract)


def cmd_extract(args) -> int:
    import json

    from jaxeff.prune.extract import extract_run
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir

    out = extract_run(args.checkpoint, args.out, args.step)
    ckpt = Checkpointer(find_checkpoint_dir(out), create=False)
    try:
        model = ckpt.read_config()["model"]
    finally:
        ckpt.close()
    print(f"extracted model saved as run {out}; its model section (for train.init_from={out}):")
    print(json.dumps({"model": model}))
    changed = {k: v for k, v in model.items() if k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                                         "d_ff", "sliding_window") and v is not None}
    print("as overrides of the source config: " + " ".join(
        f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in changed.items()))
    return 0
