"""Study: the TTT-E2E paper's toy example (its Figure 2) on the embedded `recall` domain.

Three models of the same width and depth, trained on the same documents in the same order:

* ``bigram``: a Transformer with no self-attention (configs/ttt/toy_bigram.yaml): each position sees
  only its own token, so it is a bigram model (it has the TTT model's fast MLP, never updated);
* ``ttt_b1``: the same model with TTT-E2E at mini-batch b = 1 (configs/ttt/toy_ttt.yaml): after
  every token one SGD step on the fast MLP, trained end to end through those steps;
* ``full_attention``: the same width and depth with full causal attention (toy_full_attention.yaml).

Data: `recall` documents (``pairs:`` key=value lines, prose filler, then ``queries:`` key?value for
every key in shuffled order), one document per row starting at position 0, fresh documents for
every training batch, held-out documents for the test. Output: token-level test loss vs position
(CSV, PNG, and TensorBoard: ``test/loss_vs_position`` with the position as the step) and the mean
test loss of each model; the claim checked is that TTT closes most of the gap between the bigram
model and full attention, reported as the fraction ``(bigram - ttt) / (bigram - full)`` overall
and on the query section.

    python experiments/study_ttt_toy.py --quick     # 128-token documents, 150 steps: 2.3 min of CPU time
                                                    # (7.4 min wall on the shared 2-core machine under load)
    python experiments/study_ttt_toy.py             # the configs' sizes: 15.5 min CPU time (37 min wall there)
    tensorboard --logdir runs/ttt_toy

The study owns <run-dir>/ttt_toy[_quick]/: it is deleted and rewritten on every run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import load_config
from jaxeff.data.synthetic import generate_documents
from jaxeff.data.tokenizer import load_tokenizer
from jaxeff.train.logging import RunLogger
from jaxeff.train.loop import Trainer
from _common import REPO, add_study_args, study_dir, token_nll

CONFIGS = REPO / "configs" / "ttt"
MODELS = (("bigram", "toy_bigram.yaml"), ("ttt_b1", "toy_ttt.yaml"), ("full_attention", "toy_full_attention.yaml"))
COLORS = {"bigram": (200, 60, 40), "ttt_b1": (30, 110, 200), "full_attention": (40, 160, 60)}


def rows_of(docs, tok, seq_len):
    """One document per row: ``[bos] doc [eos]`` padded to ``seq_len + 1`` -> packed arrays."""
    n = len(docs)
    full = np.full((n, seq_len + 1), tok.pad_id, np.int32)
    valid = np.zeros((n, seq_len + 1), bool)
    for r, d in enumerate(docs):
        ids = [tok.bos_id] + tok.encode(d) + [tok.eos_id]
        ids = ids[: seq_len + 1]
        full[r, : len(ids)] = ids
        valid[r, : len(ids)] = True
    inputs, targets = full[:, :-1], full[:, 1:]
    seg = valid[:, :-1].astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": seg,
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (n, 1)) * seg,
        "loss_mask": (valid[:, :-1] & valid[:, 1:]).astype(np.float32),
    }


def query_mask(docs, tok, seq_len):
    """1 at the positions whose target lies in the ``queries:`` section (after its header)."""
    m = np.zeros((len(docs), seq_len), np.float32)
    for r, d in enumerate(docs):
        start = d.find("queries:\n")
        if start < 0:
            continue
        first = 1 + start + len("queries:\n")  # index of the first query token in [bos] + doc
        last = min(1 + len(d), seq_len + 1)  # the eos target included
        m[r, first - 1 : last - 1] = 1.0
    return m


def position_losses(name, trainer, params, batch):
    """Per-token test loss ``[rows, seq]`` (0 where masked)."""
    if name == "full_attention":
        out = trainer.method.run(
            trainer.model, params, jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]), segment_ids=jnp.asarray(batch["segment_ids"])
        )
        nll = token_nll(out.logits, batch["targets"])
    else:
        import jaxeff.ttt as ttt

        tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        nll = ttt.token_losses(trainer.cfg, params, tokens)  # the stable API: pre-update losses in order
    return np.asarray(nll) * batch["loss_mask"]


def train_one(name, yaml_name, overrides, run_root, train_docs, test_docs, log_every):
    cfg = load_config(CONFIGS / yaml_name, [f"name={name}", f"logging.run_dir={run_root}", *overrides])
    shutil.rmtree(cfg.run_path, ignore_errors=True)
    tok = load_tokenizer(cfg.data.tokenizer)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state()
    logger = RunLogger(cfg.run_path, cfg.to_dict(), total_steps=cfg.train.steps, start_step=0, progress=False)
    bs, t0 = cfg.data.batch_size, time.perf_counter()
    t_first = None
    for step in range(cfg.train.steps):
        batch = rows_of(train_docs[step * bs : (step + 1) * bs], tok, cfg.data.seq_len)
        state, metrics = trainer.train_step(state, batch)
        if step == 0:
            jax.block_until_ready(metrics["loss"])
            t_first = time.perf_counter() - t0
        if (step + 1) % log_every == 0 or step + 1 == cfg.train.steps:
            m = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            logger.scalars(step + 1, m)
    train_s = time.perf_counter() - t0
    test = rows_of(test_docs, tok, cfg.data.seq_len)
    params = jax.device_get(state.params)
    nll = np.concatenate([position_losses(name, trainer, params, {k: v[i : i + 64] for k, v in test.items()}) for i in range(0, len(test_docs), 64)])
    mask = test["loss_mask"]
    qmask = query_mask(test_docs, tok, cfg.data.seq_len) * mask
    curve = nll.sum(0) / np.maximum(mask.sum(0), 1.0)
    for pos in range(len(curve)):
        if mask[:, pos].sum() >= len(test_docs) // 2:
            logger.scalars(pos, {"test/loss_vs_position": float(curve[pos])})
    result = {
        "name": name,
        "mean": float(nll.sum() / mask.sum()),
        "query": float((nll * qmask).sum() / qmask.sum()),
        "curve": curve.tolist(),
        "counts": mask.sum(0).tolist(),
        "train_s": train_s,
        "first_step_s": t_first,
        "steps": cfg.train.steps,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
    }
    logger.scalars(cfg.train.steps, {"test/loss": result["mean"], "test/loss_queries": result["query"]})
    logger.close()
    return result


def plot_png(path: Path, results, n_min):
    """Loss vs position as a PNG (matplotlib if installed, else a plain PIL line chart)."""
    curves = {r["name"]: np.asarray(r["curve"]) for r in results}
    counts = np.asarray(results[0]["counts"])
    xs = np.nonzero(counts >= n_min)[0]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, c in curves.items():
            ax.plot(xs, c[xs], label=name)
        ax.set_xlabel("token position")
        ax.set_ylabel("test loss (nats)")
        ax.set_title("recall: token-level test loss vs position")
        ax.legend()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return "matplotlib"
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 900, 500, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ymax = max(float(c[xs].max()) for c in curves.values())
    ymax = float(np.ceil(ymax))
    sx = lambda x: left + (x - xs[0]) / max(xs[-1] - xs[0], 1) * (w - left - right)
    sy = lambda y: top + (1 - y / ymax) * (h - top - bottom)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in np.arange(0, ymax + 1e-9, 1.0):
        d.line([left - 4, sy(y), left, sy(y)], fill="black")
        d.text((left - 30, sy(y) - 6), f"{y:.0f}", fill="black")
    for x in range(0, int(xs[-1]) + 1, 32):
        d.line([sx(x), h - bottom, sx(x), h - bottom + 4], fill="black")
        d.text((sx(x) - 8, h - bottom + 8), str(x), fill="black")
    d.text((w // 2 - 60, h - 20), "token position", fill="black")
    d.text((8, 8), "recall: token-level test loss (nats) vs position", fill="black")
    for k, (name, c) in enumerate(curves.items()):
        pts = [(sx(x), sy(float(c[x]))) for x in xs]
        d.line(pts, fill=COLORS.get(name, (0, 0, 0)), width=2)
        d.line([w - 190, top + 12 + 16 * k, w - 165, top + 12 + 16 * k], fill=COLORS.get(name, (0, 0, 0)), width=3)
        d.text((w - 160, top + 6 + 16 * k), name, fill="black")
    img.save(path)
    return "PIL (matplotlib is not installed)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(p, "ttt_toy", "128-token documents and 150 steps (~2.3 min of CPU time)", folder="ttt_toy", run_dir="runs")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the configs' / quick)")
    p.add_argument("--test-docs", type=int, default=None)
    p.add_argument("--inner-lr", type=float, default=None, help="inner learning rate of ttt_b1 (default: toy_ttt.yaml's)")
    p.add_argument("--models", default=",".join(m for m, _ in MODELS), help="subset to train (comma-separated)")
    args = p.parse_args(argv)
    seq = 128 if args.quick else 256
    steps = args.steps or (150 if args.quick else None)
    n_test = args.test_docs or (128 if args.quick else 256)
    common = [f"data.seq_len={seq}", f"data.doc_len={seq - 2}", f"model.max_seq_len={seq}"]
    if steps:
        common.append(f"train.steps={steps}")
    ttt_extra = [f"ttt.inner_lr={args.inner_lr}"] if args.inner_lr is not None else []
    overrides = {"bigram": common + [f"ttt.mini_batch={seq}"], "ttt_b1": common + ttt_extra, "full_attention": common}
    wanted = args.models.split(",")
    root = study_dir(args)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg0 = load_config(CONFIGS / "toy_ttt.yaml", common)
    n_steps, bs = cfg0.train.steps, cfg0.data.batch_size
    train_docs = generate_documents("recall", n_steps * bs, cfg0.data.seed, doc_len=seq - 2)
    test_docs = generate_documents("recall", n_test, 10_000 + cfg0.data.seed, doc_len=seq - 2)
    started = time.perf_counter()
    results = []
    for name, yaml_name in MODELS:
        if name not in wanted:
            continue
        r = train_one(name, yaml_name, overrides[name], root, train_docs, test_docs, log_every=10)
        results.append(r)
        print(
            f"{name:15s} test loss {r['mean']:.4f} (queries {r['query']:.4f})  {r['steps']} steps in "
            f"{r['train_s']:.0f} s (first step incl. compile {r['first_step_s']:.0f} s)  {r['params']:,} params",
            flush=True,
        )
    by = {r["name"]: r for r in results}
    if len(by) < len(MODELS):
        return
    gap = by["bigram"]["mean"] - by["full_attention"]["mean"]
    gap_q = by["bigram"]["query"] - by["full_attention"]["query"]
    closed = (by["bigram"]["mean"] - by["ttt_b1"]["mean"]) / gap if gap > 0 else float("nan")
    closed_q = (by["bigram"]["query"] - by["ttt_b1"]["query"]) / gap_q if gap_q > 0 else float("nan")
    with open(root / "loss_vs_position.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["position", "n_tokens", *by])
        for pos in range(seq):
            wr.writerow([pos, int(results[0]["counts"][pos]), *(f"{r['curve'][pos]:.5f}" for r in results)])
    how = plot_png(root / "loss_vs_position.png", results, n_min=n_test // 2)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python experiments/study_ttt_toy.py" + (" --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps else ""),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "seq_len": seq,
        "steps": n_steps,
        "test_docs": n_test,
        "wall_s": round(time.perf_counter() - started, 1),
        "test_loss": {r["name"]: round(r["mean"], 4) for r in results},
        "test_loss_queries": {r["name"]: round(r["query"], 4) for r in results},
        "gap_closed_by_ttt": round(closed, 3),
        "gap_closed_by_ttt_queries": round(closed_q, 3),
        "png": how,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    verdict = "closes most of the gap" if closed > 0.5 else "does NOT close most of the gap"
    print(
        f"\nTTT-E2E (b=1) {verdict} between the bigram model and full attention: {100 * closed:.0f}% of "
        f"{gap:.3f} nats overall, {100 * closed_q:.0f}% of {gap_q:.3f} nats on the query section"
    )
    print(f"curve: {root / 'loss_vs_position.csv'}, {root / 'loss_vs_position.png'} ({how}); TensorBoard: {root}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
