"""Study: lottery tickets (Frankle & Carbin 2019) -- eval loss vs sparsity for winning tickets, the same masks
randomly re-initialised, and the dense model.

For each seed:

1. ``ticket``: one ``method: lottery`` run (configs/prune/lottery.yaml; ``--quick``: a smaller model and
   shorter phases): a dense phase, then ``--rounds`` rounds of pruning ``--prune-fraction`` of the remaining
   block-projection weights by magnitude, rewinding the survivors to their initial values and retraining for
   the same number of steps. Its phase 0 is the dense model; phase r holds ``(1 - p)^r`` of the prunable weights;
2. ``random``: the control, ``reinit: random`` with ``masks_from`` = the ticket run: at round r exactly the
   ticket's mask, on freshly drawn random weights, trained the same way. It runs under another seed, so its
   phase 0 is a second dense model: the spread of all dense phases is the seed noise.

The table (means over seeds) gives, per share of weights kept, the final eval loss of each phase; the
verdicts check the paper's claims on the differences paired by seed: (a) tickets keeping 10-20% of the
prunable weights reach their own dense phase's loss (within ``--tolerance`` nats or the seed noise -- the
standard deviation of the dense loss over initialisations --, whichever is larger), (b) they beat the
randomly re-initialised masks at those sparsities by more than that margin.

TensorBoard: <run-dir>/lottery_study[_quick]/{ticket_s<seed>, random_s<seed>} (the runs: training curves,
``lottery/round_end/*``, ``lottery/sparsity``) and curves/{ticket, random, dense}: ``lottery/eval_loss`` and
``lottery/kept_pct`` at x = round. The study owns that folder (deleted and rewritten on every run).

    python experiments/study_lottery.py --quick        # 1 seed, 150 steps per phase: 82 s on an idle 2-core CPU, ~4 min when shared
    python experiments/study_lottery.py                # quickstart model, 4 rounds of 300 steps, 2 seeds
    tensorboard --logdir runs/lottery_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
from pathlib import Path

from _common import REPO, add_study_args, quick_overrides, study_dir, train_run

QUICK = quick_overrides()


def run_one(study: Path, name: str, seed: int, args, extra: list[str]) -> dict:
    """Train one lottery run; returns its per-phase records (``lottery.json``)."""
    from jaxeff.prune.lottery import read_record

    per = args.steps_per_round
    cfg, _, wall = train_run(
        REPO / "configs" / "prune" / "lottery.yaml",
        (QUICK if args.quick else [])
        + [
            f"name={name}",
            f"seed={seed}",
            f"logging.run_dir={study}",
            "logging.progress=false",
            f"lottery.rounds={args.rounds}",
            f"lottery.prune_fraction={args.prune_fraction}",
            f"lottery.steps_per_round={per}",
            f"train.steps={per * (args.rounds + 1)}",
            f"train.eval_every={per}",
            f"checkpoint.every={per}",
            "checkpoint.keep=1",
            *extra,
        ],
    )
    rows = read_record(cfg.run_path)["rounds"]
    print(
        f"  {name}: {cfg.train.steps} steps in {wall:.0f} s; eval loss by phase "
        + ", ".join(f"{1 - r['sparsity']:.1%} kept {r['eval_loss']:.4f}" for r in rows),
        flush=True,
    )
    return {r["round"]: r for r in rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "lottery", "smaller model, shorter phases")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 2; --quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="prunings (default 4; --quick 3)")
    ap.add_argument("--prune-fraction", type=float, default=0.5, help="share of the remaining weights pruned per round")
    ap.add_argument("--steps-per-round", type=int, default=None, help="training steps per phase (default 300; --quick 150)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="'matches dense': within this many nats (or the seed noise)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.rounds = args.rounds or (3 if args.quick else 4)
    args.steps_per_round = args.steps_per_round or (150 if args.quick else 300)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    study = study_dir(args)
    shutil.rmtree(study, ignore_errors=True)
    t_start = time.perf_counter()
    tickets, randoms = [], []
    for s in range(args.seeds):
        tickets.append(run_one(study, f"ticket_s{s}", s, args, []))
        randoms.append(run_one(study, f"random_s{s}", 1000 + s, args, ["lottery.reinit=random", f"lottery.masks_from={study / f'ticket_s{s}'}"]))

    rounds = range(args.rounds + 1)
    kept = [1 - tickets[0][r]["sparsity"] for r in rounds]
    ticket = [float(np.mean([t[r]["eval_loss"] for t in tickets])) for r in rounds]
    random = [float(np.mean([x[r]["eval_loss"] for x in randoms])) for r in rounds]
    dense = ticket[0]
    # paired per seed: the ticket run's own dense phase (same initialisation), and its control
    d_dense = [[t[r]["eval_loss"] - t[0]["eval_loss"] for t in tickets] for r in rounds]
    d_random = [[t[r]["eval_loss"] - x[r]["eval_loss"] for t, x in zip(tickets, randoms)] for r in rounds]
    # seed noise: the spread of the dense loss over initialisations (every run's phase 0: 2 per seed)
    dense_all = [t[0]["eval_loss"] for t in tickets] + [x[0]["eval_loss"] for x in randoms]
    noise = float(np.std(dense_all, ddof=1))
    margin = max(args.tolerance, noise)
    for name, ys in (("ticket", ticket), ("random", random), ("dense", [dense] * len(kept))):
        with SummaryWriter(str(study / "curves" / name)) as w:
            for r, y in zip(rounds, ys):
                w.add_scalar("lottery/eval_loss", y, r)
                w.add_scalar("lottery/kept_pct", 100 * kept[r], r)

    print()
    print(
        f"{datetime.date.today()}, {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
        f"{'quick' if args.quick else 'quickstart'} model; {args.rounds} rounds of p={args.prune_fraction}, "
        f"{args.steps_per_round} steps per phase, rewind to initialisation, per-layer magnitude; "
        f"{args.seeds} seed(s); {time.perf_counter() - t_start:.0f} s"
    )
    print("| round | prunable weights kept | winning ticket | random re-init (same masks) | ticket - dense (per seed) | ticket - random (per seed) |")
    print("|---|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r} | {kept[r]:.1%} | {ticket[r]:.4f} | {random[r]:.4f} | {np.mean(d_dense[r]):+.4f} "
            f"({', '.join(f'{v:+.3f}' for v in d_dense[r])}) | {np.mean(d_random[r]):+.4f} "
            f"({', '.join(f'{v:+.3f}' for v in d_random[r])}) |"
        )
    print()
    print(
        f"dense = round 0 of the ticket runs, mean {dense:.4f}; the {len(dense_all)} dense phases (ticket and control "
        f"runs, {len(dense_all)} initialisations): {', '.join(f'{v:.4f}' for v in dense_all)}, sd {noise:.4f}; "
        f"margin = max(--tolerance {args.tolerance}, sd) = {margin:.4f} nats"
    )
    band = [r for r in rounds if 0.10 <= kept[r] <= 0.20 + 1e-9]
    if not band:
        print("claims: no round keeps 10-20% of the weights with these settings (change --rounds / --prune-fraction)")
        return {"kept": kept, "ticket": ticket, "random": random}
    for r in band:
        dd, dr = float(np.mean(d_dense[r])), float(np.mean(d_random[r]))
        print(
            f"claim (a) tickets at {kept[r]:.1%} of the weights match the dense model: "
            f"{'HELD' if dd <= margin else 'DID NOT HOLD'} -- ticket {ticket[r]:.4f} vs dense {dense:.4f} "
            f"(paired {dd:+.4f}; margin {margin:.4f})"
        )
        print(
            f"claim (b) tickets at {kept[r]:.1%} beat the same masks randomly re-initialised: "
            f"{'HELD' if dr < -margin else 'DID NOT HOLD'} -- ticket {ticket[r]:.4f} vs random {random[r]:.4f} "
            f"(paired {dr:+.4f}; margin {margin:.4f})"
        )
    wins = sum(ticket[r] < random[r] for r in rounds[1:])
    print(f"over all pruned rounds the ticket is lower than random re-init in {wins} of {args.rounds}")
    return {"kept": kept, "ticket": ticket, "random": random, "dense": dense, "noise": noise, "d_dense": d_dense, "d_random": d_random}


if __name__ == "__main__":
    main()
