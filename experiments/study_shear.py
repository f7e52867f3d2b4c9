"""Study: Sheared-LLaMA on CPU -- prune a small pretrained model to a target shape, continue pre-training
with dynamic batch loading vs a fixed mix, against the same shape trained from scratch.

1. ``source``: pretrain the source model (configs/quickstart.yaml's shape) on the five synthetic domains,
   uniform mix, ``--source-steps`` steps;
2. ``prune``: Sheared-LLaMA structured pruning (method ``shear``, configs/prune/shear.yaml) of the source
   to the target shape for ``--prune-steps`` steps (uniform mix);
3. ``extract``: the pruned model as a smaller dense run (``jaxeff.prune.extract.extract_run``);
4. continued pre-training from it for ``--continue-steps`` steps, either
   ``continue_fixed`` (fixed uniform mix, configs/prune/continue_fixed.yaml) or
   ``continue_dynamic_u<N>`` (dynamic batch loading, configs/prune/continue_dynamic.yaml, with N weight
   updates, one per evaluation, for each N of ``--updates``: 4 (the study's first setting) and 25 (the
   paper updates every 400 steps of a 50B-token continuation: dozens of updates); reference
   losses = the SOURCE model's per-domain eval losses measured through ``data.dynamic.reference_run``;
   the paper used scaling-law predictions of the target size);
5. ``scratch``: the extracted model's exact architecture from random initialisation for prune + continue
   steps at the same batch and sequence length (same tokens; configs/prune/scratch.yaml), with the
   source's pre-training settings.

The source model's own pre-training is not counted in the token budget: reusing it is the point of
pruning. The table reports per-domain loss (nats/token) on TEST documents drawn with a seed no run saw
(the runs' eval sets also drive the dynamic weights, so they are not used for the comparison), all
rows of 32 documents per domain, plus the mean over domains.

Each run is its own Python process. TensorBoard: <run-dir>/{source,prune,pruned,continue_fixed,
continue_dynamic_u<N>,scratch}; continue_dynamic_u<N> have data/weight/<domain>, data/delta/<domain> and
at_start/reference_loss/<domain>; every run has eval/loss/<domain>.

    python experiments/study_shear.py --quick    # small model, ~5 min on 2 shared CPU cores
    python experiments/study_shear.py            # configs' sizes (quickstart shape -> sheared)
    python experiments/study_shear.py --roles continue_dynamic_u25   # one more run, merged into results.json
    tensorboard --logdir runs/shear_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

from _common import REPO, add_study_args, print_result, quick_data, quick_model, run_worker, study_dir, train_run, train_steps

DOMAINS = ("arithmetic", "records", "prose", "code", "recall")
TEST_DOCS = 32
TEST_SEED_OFFSET = 2_000_003  # eval docs use data.seed + 1_000_003 (jaxeff.train.inputs); tests another seed
# --quick: a 4-layer d=64 source pruned to 3 layers, d=48, 1 of 2 kv groups, 128 of 192 units
QUICK_SOURCE = quick_model(n_layers=4) + ["model.n_heads=4", "model.n_kv_heads=2"]
QUICK_TARGET = ["prune.target.d_model=48", "prune.target.n_heads=2", "prune.target.n_layers=3", "prune.target.d_ff=128"]
QUICK_DATA = quick_data()


def roles(args) -> list[str]:
    return ["source", "prune", "extract", "continue_fixed"] + [f"continue_dynamic_u{n}" for n in args.updates] + ["scratch"]


def common(args, name: str) -> list[str]:
    return (QUICK_DATA if args.quick else []) + [
        f"name={name}",
        f"logging.run_dir={args.run_dir}",
        "logging.progress=false",
        f"data.domains=[{','.join(DOMAINS)}]",
        "data.weights=null",
    ]


def model_of(run: Path) -> dict:
    """The model section a run's newest checkpoint was written with."""
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir

    ckpt = Checkpointer(find_checkpoint_dir(run), create=False)
    try:
        return ckpt.read_config()["model"]
    finally:
        ckpt.close()


def config(args, role: str):
    from jaxeff.config import from_dict, load_config

    run = Path(args.run_dir)
    every = max(args.continue_steps // 4, 1)  # evaluations of the fixed run and of scratch: 4
    dynamic = role.startswith("continue_dynamic_u")
    if dynamic:
        every = max(args.continue_steps // int(role.removeprefix("continue_dynamic_u")), 1)
    if role == "source":
        overrides = (QUICK_SOURCE if args.quick else []) + train_steps(args.source_steps)
        return load_config(REPO / "configs" / "quickstart.yaml", common(args, role) + overrides)
    if role == "prune":
        overrides = (QUICK_SOURCE + QUICK_TARGET if args.quick else []) + [f"train.init_from={run / 'source'}", *train_steps(args.prune_steps)]
        return load_config(REPO / "configs" / "prune" / "shear.yaml", common(args, role) + overrides)
    steps = args.prune_steps + args.continue_steps if role == "scratch" else args.continue_steps
    overrides = [*train_steps(steps, every), "train.eval_batches=4"]
    if role == "scratch":
        overrides.append(f"optim.warmup_steps={max(steps // 15, 1)}")  # quickstart: 20 of 300
    else:
        overrides.append(f"train.init_from={run / 'pruned'}")
    if dynamic:
        overrides.append(f"data.dynamic.reference_run={run / 'source'}")
    yaml_name = "continue_dynamic" if dynamic else role
    cfg = load_config(REPO / "configs" / "prune" / f"{yaml_name}.yaml", common(args, role) + overrides)
    raw = cfg.to_dict()
    raw["model"] = model_of(run / "pruned")  # exactly the extracted architecture (both sizes of the study)
    return from_dict(raw)


def test_losses(cfg) -> dict[str, float]:
    """Per-domain mean loss on TEST_DOCS documents per domain that no run trained or evaluated on."""
    from jaxeff.data.packing import pack_texts
    from jaxeff.data.synthetic import generate_documents
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.train.loop import load_params

    tok = load_tokenizer(cfg.data.tokenizer)
    sets = {
        d: pack_texts(generate_documents(d, TEST_DOCS, cfg.data.seed + TEST_SEED_OFFSET, doc_len=cfg.data.doc_len), tok, cfg.data.seq_len) for d in DOMAINS
    }
    trainer, params = load_params(cfg, cfg.checkpoint_path)
    ev = trainer.evaluate(params, sets, max_batches=10**6)
    return {d: ev[f"eval/loss/{d}"] for d in DOMAINS}


def worker(args) -> None:
    """One step of the study in this process; prints one JSON line of results."""
    role = args.worker
    run = Path(args.run_dir)
    t0 = time.perf_counter()
    if role == "extract":
        from jaxeff.prune.extract import extract_run

        shutil.rmtree(run / "pruned", ignore_errors=True)
        extract_run(run / "prune", run / "pruned")
        cfg = config(args, "continue_fixed")  # the extracted model with the study's data settings
        cfg = type(cfg).model_validate({**cfg.to_dict(), "name": "pruned", "train": {**cfg.to_dict()["train"], "init_from": None}})
        row = {"name": "pruned", "tokens": 0, "model": model_of(run / "pruned")}
    else:
        cfg = config(args, role)
        dynamic = cfg.data.dynamic.enabled
        out = train_run(cfg).out
        row = {
            "name": role,
            "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
            "params": cfg.model.param_count(),
            "weights": {d: out.get(f"data/weight/{d}") for d in DOMAINS} if dynamic else None,
            "updates": cfg.train.steps // cfg.train.eval_every if dynamic else 0,
        }
    row["test"] = test_losses(cfg)
    row["mean"] = sum(row["test"].values()) / len(DOMAINS)
    row["wall_s"] = time.perf_counter() - t0
    print_result(row)


def run_child(args, role: str) -> dict:
    argv = [
        "--run-dir",
        str(args.run_dir),
        "--source-steps",
        str(args.source_steps),
        "--prune-steps",
        str(args.prune_steps),
        "--continue-steps",
        str(args.continue_steps),
        "--updates",
        ",".join(map(str, args.updates)),
    ] + (["--quick"] if args.quick else [])
    row = run_worker(__file__, role, argv)
    print(f"  {role:17s} {row['wall_s']:5.0f}s  mean test loss {row['mean']:.4f}", flush=True)
    return row


def table(rows: dict[str, dict], args) -> str:
    updates = sorted({int(k.removeprefix("continue_dynamic_u")) for k in rows if k.startswith("continue_dynamic_u")})
    label = {
        "source": f"source ({args.source_steps} steps, not counted)",
        "prune": f"shear-pruned, masks applied ({args.prune_steps} steps)",
        "pruned": "extracted (= prune row, dense)",
        "continue_fixed": f"pruned + {args.continue_steps} steps, fixed uniform mix",
        **{
            f"continue_dynamic_u{n}": f"pruned + {args.continue_steps} steps, dynamic batch loading, {rows[f'continue_dynamic_u{n}']['updates']} updates"
            for n in updates
        },
        "scratch": f"from scratch, {args.prune_steps + args.continue_steps} steps",
    }
    tokens = {
        "source": args.source_steps,
        "prune": args.prune_steps,
        "pruned": args.prune_steps,
        "continue_fixed": args.prune_steps + args.continue_steps,
        **{f"continue_dynamic_u{n}": args.prune_steps + args.continue_steps for n in updates},
        "scratch": args.prune_steps + args.continue_steps,
    }
    tok_per_step = rows["scratch"]["tokens"] // (args.prune_steps + args.continue_steps)
    lines = ["| run | target-shape tokens | " + " | ".join(DOMAINS) + " | mean |", "|---" * (len(DOMAINS) + 3) + "|"]
    for name in label:
        if name not in rows:
            continue
        r = rows[name]
        n_tok = "-" if name == "source" else f"{tokens[name] * tok_per_step / 1e3:.0f}k"
        lines.append(f"| {label[name]} | {n_tok} | " + " | ".join(f"{r['test'][d]:.4f}" for d in DOMAINS) + f" | {r['mean']:.4f} |")
    return "\n".join(lines)


def verdict(rows: dict[str, dict]) -> str:
    dyn = [k for k in rows if k.startswith("continue_dynamic_u")]
    s, f = rows["scratch"]["mean"], rows["continue_fixed"]["mean"]
    best = min([f] + [rows[k]["mean"] for k in dyn])
    out = [f"pruned-and-continued beats from-scratch: {'YES' if best < s else 'NO'} (best continued {best:.4f} vs scratch {s:.4f}, {s - best:+.4f} nats)"]
    src, fix = rows["source"]["test"], rows["continue_fixed"]["test"]
    worst = max(DOMAINS, key=lambda x: fix[x] - src[x])
    for k in dyn:
        d = rows[k]["mean"]
        gap = max(rows[k]["test"][x] - src[x] for x in DOMAINS)
        out.append(
            f"{k} beats the fixed mix: {'YES' if d < f else 'NO'} (mean {d:.4f} vs {f:.4f}, {f - d:+.4f} nats; "
            f"largest gap to the source {gap:+.4f} vs the fixed mix's {fix[worst] - src[worst]:+.4f} on {worst})"
        )
        w = rows[k].get("weights") or {}
        if w and all(v is not None for v in w.values()):
            out.append(f"  final weights of {k}: " + ", ".join(f"{n} {v:.3f}" for n, v in w.items()))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(p, "shear", "small model, few steps (~5 min on 2 shared CPU cores)", owns_run_dir=True)
    p.add_argument("--source-steps", type=int, default=None)
    p.add_argument("--prune-steps", type=int, default=None)
    p.add_argument("--continue-steps", type=int, default=None)
    p.add_argument("--updates", default="4,25", help="weight updates of each dynamic run (comma-separated)")
    p.add_argument("--roles", default=None, help="run only these (comma-separated), merging into results.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.run_dir = str(study_dir(args).absolute())
    args.source_steps = args.source_steps or (200 if args.quick else 400)
    args.prune_steps = args.prune_steps or (40 if args.quick else 100)
    args.continue_steps = args.continue_steps or (80 if args.quick else 200)
    args.updates = [int(n) for n in str(args.updates).split(",") if n]
    if args.worker:
        worker(args)
        return
    t0 = time.perf_counter()
    print(
        f"Sheared-LLaMA study ({'quick' if args.quick else 'full'}): source {args.source_steps} steps, prune "
        f"{args.prune_steps}, continue {args.continue_steps}, scratch {args.prune_steps + args.continue_steps}; "
        f"runs in {args.run_dir}",
        flush=True,
    )
    results = Path(args.run_dir) / "results.json"
    todo = roles(args) if args.roles is None else args.roles.split(",")
    rows = json.loads(results.read_text()) if args.roles is not None and results.exists() else {}
    for role in todo:
        row = run_child(args, role)
        rows[row["name"]] = row
    cmd = "python experiments/study_shear.py" + (" --quick" if args.quick else "")
    text = (
        f"{cmd}  ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU, 2 shared cores, "
        f"{time.perf_counter() - t0:.0f} s)\n\ntest loss (nats/token) on {TEST_DOCS} unseen documents per domain\n\n"
        f"{table(rows, args)}\n\n{verdict(rows)}\n"
    )
    print("\n" + text)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / "results.md").write_text(text)
    results.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
