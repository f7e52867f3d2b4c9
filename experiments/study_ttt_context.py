"""Study: does more context help TTT-E2E as it helps full attention? Loss vs position on real code.

The paper's central claim (Tandon et al. 2025, "End-to-End Test-Time Training for Long Context"):
TTT-E2E scales with context like full attention — its loss keeps falling as the context grows,
where a sliding-window model's stops falling once the context exceeds its window. The recall study
(``study_ttt_long.py``) could not test it: at CPU scale full attention never learned to copy. This
study uses the real text every machine has, the Python standard library's own source files (code,
comments, docstrings), where context helps without any copy circuit: which identifiers, imports,
indentation and style a file uses.

1. Data: the ``*.py`` files of this interpreter's standard library (``sysconfig`` ``stdlib``;
   non-ASCII characters replaced by ``?``), split by file into train and test (a hash of the
   relative path: ~5 % of the files are test files, never trained on), cut into non-overlapping
   chunks of T - 2 characters (one chunk = one row: bos + chunk + eos, so a row is one contiguous
   piece of one file and the token at position t has exactly t tokens of context).
2. Train at context T = 512 with equal training compute (``--equal-compute``, default; the
   FLOPs/token of ``study_ttt_long.train_flops_per_token``: TTT-E2E trains ``--steps``, the cheaper
   models proportionally more steps, on more chunks) or equal tokens (``--equal-tokens``):
   full attention, sliding window k = 64, TTT-E2E (the same window, fast MLPs in the last quarter
   of the blocks, one inner step per b = 16 tokens).
3. Evaluate per-token test loss by position (= context length) bucket, at L = T and at L = 2T (test
   chunks of 2T - 2 characters: beyond the training context), and the TTT-E2E model without
   test-time updates (inner lr 0) as an ablation.
4. Differences to the sliding window on the same test chunks (mean +- standard error over chunks),
   and whether a model gains more from context beyond the window than the window model does (its
   difference to the window falls from the first bucket beyond the window to the last by more than
   two standard errors).
5. Claim check, at each position bucket beyond the window where full attention beats the window by
   at least 0.02 nats: TTT-E2E recovers at least half of that gap.

TensorBoard: <run-dir>/ttt_context/{full,window,ttt_e2e} (training) and .../eval (x axis = end of
the position bucket, in tokens). Results: .../results.json; ``--report results.json`` reprints.

    python experiments/study_ttt_context.py --quick   # smoke: tiny budget (~5 min on 2 CPU cores)
    python experiments/study_ttt_context.py           # the documented run (docs/ttt_long.md)
    python experiments/study_ttt_context.py --eval-only   # evaluate its saved models again
    python experiments/study_ttt_context.py --equal-tokens --steps 1228 --models full --run-dir runs/ttt_context_full1228
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sysconfig
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from _common import add_study_args, study_dir, train_run
from study_ttt_long import configs as long_configs
from study_ttt_long import gap_recovered, losses_of, median_step_time, train_flops_per_token

from jaxeff.config import from_dict
from jaxeff.data.tokenizer import ByteTokenizer
from jaxeff.train.loop import load_params

MODEL_NAMES = ("full", "window", "ttt_e2e")
TEST_EVERY = 20  # a file is a test file when crc32(relative path) % TEST_EVERY == 0
SIZES = {
    "quick": dict(d_model=64, n_layers=4, n_heads=4, d_ff=192, T=256, k=32, b=16, batch=4, steps=40, n_eval=8),
    "full": dict(d_model=64, n_layers=4, n_heads=4, d_ff=192, T=512, k=64, b=16, batch=8, steps=500, n_eval=32),
}


def stdlib_files() -> tuple[list[Path], list[Path], Path]:
    """(train files, test files, root): the interpreter's standard library ``*.py`` files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    if not files:
        raise SystemExit(f"no standard-library .py files under {root}")
    test = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % TEST_EVERY == 0]
    train = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % TEST_EVERY != 0]
    return train, test, root


def chunks_of(files: list[Path], n_chars: int) -> list[str]:
    """Non-overlapping ``n_chars``-character chunks of every file (the short tail dropped)."""
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        text = "".join(c if ord(c) < 128 else "?" for c in text)
        out.extend(text[i : i + n_chars] for i in range(0, len(text) - n_chars + 1, n_chars))
    return out


def configs(size: dict, study: Path, seed: int, steps: dict[str, int], train_file: Path, match_params: bool = False) -> dict:
    """The recall study's three configs on the stdlib chunks of ``train_file``."""
    return long_configs(
        size,
        study,
        seed,
        steps,
        max_seq_len=2 * size["T"],
        data=dict(source="files", paths=[str(train_file)], format="json", eval_fraction=0.02),
        ttt=dict(match_params=True) if match_params else None,
    )


def eval_tokens(chunks: list[str], length: int) -> np.ndarray:
    tok = ByteTokenizer()
    rows = [[tok.bos_id, *tok.encode(c), tok.eos_id] for c in chunks]
    assert all(len(r) == length for r in rows), "chunks must be length - 2 ASCII characters"
    return np.asarray(rows, np.int32)


def buckets(length: int, k: int) -> list[tuple[int, int]]:
    """Position buckets [lo, hi) of the predictions: the first window split in two, then doublings."""
    edges = [0, k // 2, k]
    while edges[-1] < length - 1:
        edges.append(min(edges[-1] * 2, length - 1))
    return list(zip(edges[:-1], edges[1:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "ttt_context", "tiny budget (~5 min on 2 CPU cores)", folder="ttt_context", run_dir="runs")
    ap.add_argument("--steps", type=int, default=None, help="TTT-E2E's training steps (the others: equal compute)")
    ap.add_argument("--equal-tokens", action="store_true", help="every model trains --steps (not equal compute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_NAMES,
        default=list(MODEL_NAMES),
        help="train and evaluate only these (steps still set by the three models' FLOPs; the claim check needs all three)",
    )
    ap.add_argument("--report", metavar="RESULTS_JSON")
    ap.add_argument(
        "--match-params",
        action="store_true",
        help="TTT-E2E with ttt.match_params (its fast blocks' MLPs narrowed to the baselines' parameter "
        "count); the FLOPs estimate (and so the others' equal-compute steps) stays the unmatched one",
    )
    ap.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the models a finished study in --run-dir trained (its results.json: steps, training info) again, without training",
    )
    args = ap.parse_args(argv)
    if args.report:
        d = json.loads(Path(args.report).read_text())
        return report(d, Path(args.report).parent)

    size = dict(SIZES["quick" if args.quick else "full"])
    if args.steps:
        size["steps"] = args.steps
    T, k = size["T"], size["k"]
    study = study_dir(args)
    previous = json.loads((study / "results.json").read_text()) if args.eval_only else None
    if previous is None:
        shutil.rmtree(study, ignore_errors=True)
        study.mkdir(parents=True)
    t_start = time.perf_counter()

    train_files, test_files, root = stdlib_files()
    train_file = study / "train.jsonl"
    if previous is None:
        rng = np.random.default_rng(args.seed)
        train_chunks = chunks_of(train_files, T - 2)
        rng.shuffle(train_chunks)
        same = {m: size["steps"] for m in MODEL_NAMES}
        probe = configs(size, study, args.seed, same, train_file)
        flops = {m: train_flops_per_token(c) for m, c in probe.items()}
        steps = same if args.equal_tokens else {m: max(1, round(size["steps"] * flops["ttt_e2e"] / f)) for m, f in flops.items()}
        need = int(max(steps.values()) * size["batch"] * 1.03) + 1  # + the 2 % eval split
        if len(train_chunks) < need:
            raise SystemExit(f"only {len(train_chunks)} training chunks of {T - 2} characters; need {need}")
        with train_file.open("w") as f:
            for c in train_chunks[:need]:
                f.write(json.dumps({"text": c}) + "\n")
        print(
            f"stdlib {root}: {len(train_files)} train files ({len(train_chunks)} chunks of {T - 2} chars, "
            f"{need} used), {len(test_files)} test files; steps {steps}",
            flush=True,
        )
    else:  # the finished study's models, as they were trained
        steps, args.models = previous["steps"], list(previous["info"])
        args.match_params = previous.get("match_params", False)
        print(f"re-evaluating {', '.join(args.models)} in {study} on {len(test_files)} test files of {root}", flush=True)
    cfgs = {m: c for m, c in configs(size, study, args.seed, steps, train_file, args.match_params).items() if m in args.models}

    trained, info = {}, {}
    for name, cfg in cfgs.items():
        if previous is not None:
            trained[name] = load_params(cfg, cfg.checkpoint_path)[1]
            info[name] = previous["info"][name]
            continue
        _, out, wall = train_run(cfg)
        trainer, params = load_params(cfg, cfg.checkpoint_path)
        trained[name] = params
        info[name] = {
            "params": trainer.n_params,
            "steps": cfg.train.steps,
            "wall_s": wall,
            "eval_loss": out["eval/loss"],
            "flops_tok": flops[name],
            "step_s": median_step_time(cfg.run_path),
        }
        print(f"trained {name}: {trainer.n_params:,} params, {cfg.train.steps} steps, {wall:.0f} s, eval loss {out['eval/loss']:.3f}", flush=True)

    if "ttt_e2e" in cfgs:
        no_update = cfgs["ttt_e2e"].to_dict()
        no_update["ttt"]["inner_lr"] = 0.0
        cfgs["ttt_e2e_no_update"] = from_dict(no_update)
        trained["ttt_e2e_no_update"] = trained["ttt_e2e"]

    results = {}
    test_rng = np.random.default_rng(args.seed + 1)
    for L in (T, 2 * T):
        chunks = chunks_of(test_files, L - 2)
        pick = test_rng.choice(len(chunks), size=min(size["n_eval"], len(chunks)), replace=False)
        tokens = eval_tokens([chunks[i] for i in sorted(pick)], L)
        for m in cfgs:
            kind = "ttt_e2e" if m.startswith("ttt_e2e") else m
            ls = losses_of(kind, cfgs[m], trained[m], tokens)  # [n, L - 1]; eos target at the end included
            results.setdefault(m, {})[L] = {
                "all": float(ls.mean()),
                "buckets": {f"{lo}-{hi}": float(ls[:, lo:hi].mean()) for lo, hi in buckets(L, k)},
                "per_chunk": {f"{lo}-{hi}": ls[:, lo:hi].mean(axis=1).tolist() for lo, hi in buckets(L, k)},
            }
        print(f"evaluated L={L} on {len(pick)} test chunks", flush=True)

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(study / "eval"))
    for m, by_len in results.items():
        for L, r in by_len.items():
            for key, v in r["buckets"].items():
                writer.add_scalar(f"loss_by_position_L{L}/{m}", v, global_step=int(key.split("-")[1]))
    writer.close()
    budget = previous["budget"] if previous else "equal tokens" if args.equal_tokens else "equal compute"
    d = {
        "size": size,
        "steps": steps,
        "budget": budget,
        "match_params": args.match_params,
        "info": info,
        "results": results,
        "wall_s": previous["wall_s"] if previous else time.perf_counter() - t_start,  # of training + eval
        "date": str(datetime.date.today()),
        "device": jax.devices()[0].device_kind,
        "stdlib": str(root),
        "n_train_files": len(train_files),
        "n_test_files": len(test_files),
    }
    (study / "results.json").write_text(json.dumps(d, indent=1))
    return report(json.loads(json.dumps(d)), study)


def report(d: dict, study: Path):
    size, info, results = d["size"], d["info"], d["results"]
    T, k, b = size["T"], size["k"], size["b"]
    matched = ", parameter-matched" if d.get("match_params") else ""
    names = {
        "full": "full attention",
        "window": f"sliding window k={k}",
        "ttt_e2e": f"TTT-E2E (k={k}, b={b}{matched})",
        "ttt_e2e_no_update": f"TTT-E2E{matched} without updates (inner lr 0)",
    }
    print()
    print(f"{d['date']}, {d['device']}; runs in {study}; study wall {d['wall_s'] / 60:.1f} min")
    print(
        f"model d={size['d_model']}, {size['n_layers']} layers, byte vocabulary; Python stdlib source "
        f"({d['n_train_files']} train / {d['n_test_files']} test files); T={T}, {size['batch']} rows per step, "
        f"{d['budget']}"
    )
    print()
    print("| training run | params | steps | train FLOPs/token | train FLOPs (total) | step (s, median) | wall (s) | final eval loss |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in info.items():
        est = " (est.)" if m == "ttt_e2e" else ""
        total = r["flops_tok"] * r["steps"] * size["batch"] * T
        print(
            f"| {names[m]} | {r['params']:,} | {r['steps']} | {r['flops_tok'] / 1e6:.2f}M{est} | {total:.3g} | "
            f"{r['step_s']:.3f} | {r['wall_s']:.0f} | {r['eval_loss']:.3f} |"
        )
    first = next(iter(results.values()))
    for L in first:
        keys = list(first[L]["buckets"])
        print()
        print(f"test loss (nats/token) by position = context length, L={L}" + (" (beyond the training context T)" if int(L) > T else ""))
        print("| model | mean | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 2) + "|")
        for m, by_len in results.items():
            r = by_len[L]
            print(f"| {names[m]} | {r['all']:.3f} | " + " | ".join(f"{r['buckets'][q]:.3f}" for q in keys) + " |")
    if "window" in results and "per_chunk" in first[next(iter(first))]:
        for L in first:
            keys = list(first[L]["buckets"])
            print()
            print(
                f"difference to the sliding window on the same test chunks, L={L}: mean +- standard error over "
                f"the chunks (negative = lower loss than the window)"
            )
            print("| model | " + " | ".join(keys) + " |")
            print("|---" * (len(keys) + 1) + "|")
            for m, by_len in results.items():
                if m == "window":
                    continue
                cells = []
                for q in keys:
                    diff = np.asarray(by_len[L]["per_chunk"][q]) - np.asarray(results["window"][L]["per_chunk"][q])
                    cells.append(f"{diff.mean():+.3f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}")
                print(f"| {names[m]} | " + " | ".join(cells) + " |")
        print()
        print(
            "does a model gain more from context beyond the window than the window model does? change of its "
            "difference to the window from the first bucket beyond the window to the last, per chunk "
            "(mean +- standard error; YES when below zero by more than two standard errors)"
        )
        for L in first:
            keys = [q for q in first[L]["buckets"] if int(q.split("-")[0]) >= k]
            for m, by_len in results.items():
                if m == "window" or len(keys) < 2:
                    continue
                d = [np.asarray(by_len[L]["per_chunk"][q]) - np.asarray(results["window"][L]["per_chunk"][q]) for q in (keys[0], keys[-1])]
                change = d[1] - d[0]
                mean, se = change.mean(), change.std(ddof=1) / np.sqrt(len(change))
                print(f"  L={L} {names[m]}: positions {keys[0]} -> {keys[-1]}: {mean:+.3f} +- {se:.3f} -> {'YES' if mean < -2 * se else 'NO'}")
    if not all(m in results for m in MODEL_NAMES):
        print("(the claim check needs all three models: not run)")
        return results
    print()
    print(
        "claim: TTT-E2E scales with context like full attention: at every position bucket beyond the window "
        "where full attention beats the window by >= 0.02 nats, TTT-E2E recovers at least half of that gap"
    )
    held = []
    for L in results["full"]:
        for q in results["full"][L]["buckets"]:
            lo = int(q.split("-")[0])
            if lo < k:
                continue
            f, w, e = (results[m][L]["buckets"][q] for m in ("full", "window", "ttt_e2e"))
            line = f"  L={L} positions {q}: full {f:.3f}, window {w:.3f}, TTT-E2E {e:.3f}; "
            rec = gap_recovered(f, w, e, 0.02)
            if rec is None:
                print(line + f"not testable (window - full = {w - f:+.3f})")
                continue
            held.append(rec >= 0.5)
            print(line + f"TTT-E2E recovers {rec * 100:.0f}% of the gap -> {'HELD' if rec >= 0.5 else 'DID NOT HOLD'}")
    print(f"  overall: {'held' if held and all(held) else 'did not hold' if held else 'not testable'} ({sum(held)} of {len(held)} testable buckets)")
    return results


if __name__ == "__main__":
    main()
