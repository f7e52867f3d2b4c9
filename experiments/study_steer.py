"""Study: activation addition steers a small LM trained on the synthetic mix toward one domain.

1. train a small model on four domains of the embedded corpus (``arithmetic, records, prose, code``,
   uniform mixture) -- or reuse a run with ``--base RUN`` (its model must know these domains);
2. record steering vectors with ``jaxeff.steer.record``: the mean residual stream after block L of
   ``code`` snippets minus that of ``prose`` snippets (first 48 characters of documents the model
   never trained on), from one pair of prompts and from a set of 8 of each;
3. for each vector, layer and scale, sample 32 continuations of the bare BOS prompt (48 new tokens,
   temperature 1, same random keys for every scale) with the vector added after block L at every
   position, and classify each continuation into a domain with a character-trigram naive Bayes
   classifier trained on other documents of the corpus (its accuracy on 48-character chunks of
   held-out documents is printed, so the measurement itself is checked), or as ``invalid`` when it
   holds a non-ASCII byte or a run of 17+ equal characters (degenerate text: the longest run in any
   48-character chunk of the corpus is 12 spaces of code indentation);
4. also measure, teacher-forced, the per-token loss of held-out ``code`` and ``prose`` documents
   under the same steering.

Claim checked (held / did not hold, with numbers): for some layer and scale <= 8 the share of
continuations classified as code rises by at least 0.25 over scale 0, and at that setting the code
loss falls relative to the prose loss (steering toward code, not just damage).

TensorBoard: <run-dir>/steer_<source>_L<layer> with steer/share_<domain> and steer/loss_<domain>
at step = scale; the training run in <run-dir>/model.

    python experiments/study_steer.py --quick        # a few minutes on a 2-core CPU
    python experiments/study_steer.py                # quickstart-size model, longer
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import re
import time
from pathlib import Path

from _common import REPO, add_study_args, quick_overrides, study_dir, token_nll, train_run, train_steps

DOMAINS = ("arithmetic", "records", "prose", "code")
POS, NEG = "code", "prose"
QUICK = quick_overrides(n_layers=2)
SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)  # multiples of the recorded vector (its norm is printed)
N_SAMPLES, NEW_TOKENS, PROMPT_CHARS = 32, 48, 48


class TrigramNB:
    """Character-trigram naive Bayes over the domains (add-one smoothing)."""

    def __init__(self, texts_by_domain: dict[str, list[str]]):
        self.counts, self.totals = {}, {}
        vocab = set()
        for d, texts in texts_by_domain.items():
            c = collections.Counter(t[i : i + 3] for t in texts for i in range(len(t) - 2))
            self.counts[d], self.totals[d] = c, sum(c.values())
            vocab |= set(c)
        self.v = len(vocab) + 1

    def classify(self, text: str) -> str:
        if any(not (32 <= ord(ch) < 127 or ch == "\n") for ch in text) or re.search(r"(.)\1{16,}", text):
            return "invalid"  # the corpus is printable ASCII, and no 48-char chunk of it repeats a character 17 times
        grams = [text[i : i + 3] for i in range(len(text) - 2)]
        if not grams:
            return "empty"
        score = {d: sum(math.log((self.counts[d][g] + 1) / (self.totals[d] + self.v)) for g in grams) for d in self.counts}
        return max(score, key=score.get)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(p, "steer", "small model (a few minutes on a 2-core CPU)", owns_run_dir=True)
    p.add_argument("--steps", type=int, default=None, help="training steps of the model")
    p.add_argument("--base", default=None, help="use this run instead of training one")
    args = p.parse_args()
    args.run_dir = str(study_dir(args))
    args.steps = args.steps or (300 if args.quick else 800)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.data.synthetic import generate_documents
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import one_device_config
    from jaxeff.steer import record_text, steer_generate, steered_forward
    from jaxeff.train.checkpoint import find_checkpoint_dir
    from jaxeff.train.loop import load_params

    t0 = time.perf_counter()
    rd = Path(args.run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    if args.base:
        run = Path(args.base)
    else:
        run = train_run(
            REPO / "configs" / "quickstart.yaml",
            (QUICK if args.quick else [])
            + ["name=model", f"logging.run_dir={rd}", "logging.progress=false", f"data.domains=[{','.join(DOMAINS)}]", *train_steps(args.steps)],
        ).cfg.run_path
        print(f"  trained {run} ({time.perf_counter() - t0:.0f} s)", flush=True)
    cfg = one_device_config(read_config(run), **{"data.batch_size": 1})
    trainer, params = load_params(cfg, find_checkpoint_dir(run), devices=jax.devices()[:1])
    model, tok = trainer.model, load_tokenizer(cfg.data.tokenizer)

    # the measuring instrument: a domain classifier, and its accuracy on held-out chunks
    clf = TrigramNB({d: generate_documents(d, 200, seed=777) for d in DOMAINS})
    held = {d: [doc[:NEW_TOKENS] for doc in generate_documents(d, 50, seed=778)] for d in DOMAINS}
    acc = {d: float(np.mean([clf.classify(t) == d for t in texts])) for d, texts in held.items()}
    print("  classifier accuracy on held-out 48-char chunks: " + ", ".join(f"{d} {a:.2f}" for d, a in acc.items()))

    snippets = {d: [doc[:PROMPT_CHARS] for doc in generate_documents(d, 8, seed=779)] for d in (POS, NEG)}
    sources = {"pair": (snippets[POS][:1], snippets[NEG][:1]), "set8": (snippets[POS], snippets[NEG])}
    # teacher-forced loss texts: held-out documents, cut to the same length
    L = min(cfg.model.max_seq_len, 64) - 1
    lm_texts = {d: [doc[:L] for doc in generate_documents(d, 16, seed=780) if len(doc) >= L] for d in (POS, NEG)}

    def loss_of(texts, vector, layer, scale):
        ids = np.asarray([[tok.bos_id] + tok.encode(t) for t in texts], np.int32)
        logits = steered_forward(model, params, ids, vector=vector, layer=layer, scale=scale, apply_fn=trainer.method.run).logits
        return float(jnp.mean(token_nll(logits[:, :-1], ids[:, 1:])))

    prompt = np.full((N_SAMPLES, 1), tok.bos_id, np.int32)
    rows = []
    for source, (pos, neg) in sources.items():
        for layer in range(cfg.model.n_layers):
            v = record_text(model, params, tok, pos, neg, layer, trainer.method.run)
            with SummaryWriter(str(rd / f"steer_{source}_L{layer}")) as w:
                for scale in SCALES:
                    new = np.asarray(
                        steer_generate(
                            model,
                            params,
                            prompt,
                            jax.random.PRNGKey(0),
                            vector=v,
                            layer=layer,
                            scale=scale,
                            max_new_tokens=NEW_TOKENS,
                            temperature=1.0,
                            apply_fn=trainer.method.run,
                        )
                    )
                    texts = []
                    for row in new.tolist():
                        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
                        texts.append(tok.decode(row))
                    labels = collections.Counter(clf.classify(t) for t in texts)
                    share = {d: labels[d] / N_SAMPLES for d in DOMAINS + ("invalid",)}
                    losses = {d: loss_of(lm_texts[d], v, layer, scale) for d in (POS, NEG)}
                    rows.append(
                        {
                            "source": source,
                            "layer": layer,
                            "scale": scale,
                            "norm": float(jnp.linalg.norm(v)),
                            "share": share,
                            "loss": losses,
                            "example": texts[0],
                        }
                    )
                    step = int(round(100 * scale))  # TensorBoard steps are integers: step = 100 x scale
                    for d, val in share.items():
                        w.add_scalar(f"steer/share_{d}", val, step)
                    for d, val in losses.items():
                        w.add_scalar(f"steer/loss_{d}", val, step)
            print(
                f"  {source} layer {layer}: code share "
                + " ".join(f"{r['share'][POS]:.2f}" for r in rows if r["source"] == source and r["layer"] == layer),
                flush=True,
            )

    lines = [
        "| vector | layer | scale | code | prose | arithmetic | records | invalid | loss code | loss prose | sample (first 40 chars) |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        s, lo = r["share"], r["loss"]
        sample = r["example"][:40].replace("\n", "\\n").replace("|", "/")
        lines.append(
            f"| {r['source']} (norm {r['norm']:.2f}) | {r['layer']} | {r['scale']} | {s['code']:.2f} | "
            f"{s['prose']:.2f} | {s['arithmetic']:.2f} | {s['records']:.2f} | {s['invalid']:.2f} | "
            f"{lo[POS]:.4f} | {lo[NEG]:.4f} | "
            f"`{sample}` |"
        )
    table = "\n".join(lines)

    base = {(r["source"], r["layer"]): r for r in rows if r["scale"] == 0}
    valid = [r for r in rows if r["scale"] > 0 and r["share"]["invalid"] <= 0.1]

    def contrast(r):
        return r["share"][POS] - r["share"][NEG]

    claims = []
    if not valid:
        claims.append("no steered setting kept >= 90% of continuations valid text: did NOT hold")
    else:
        best = max(valid, key=lambda r: contrast(r) - contrast(base[r["source"], r["layer"]]))
        b0 = base[best["source"], best["layer"]]
        gain = contrast(best) - contrast(b0)
        claims.append(
            f"shift along the contrast (share code - share prose, valid text >= 90%): best {best['source']} layer "
            f"{best['layer']} scale {best['scale']:g}: {contrast(b0):+.2f} -> {contrast(best):+.2f} ({gain:+.2f}; code "
            f"{b0['share'][POS]:.2f} -> {best['share'][POS]:.2f}, "
            f"prose {b0['share'][NEG]:.2f} -> {best['share'][NEG]:.2f}): "
            f"{'held' if gain >= 0.25 else 'did NOT hold'} (rise >= 0.25)"
        )
        best_pos = max(valid, key=lambda r: r["share"][POS] - base[r["source"], r["layer"]]["share"][POS])
        g = best_pos["share"][POS] - base[best_pos["source"], best_pos["layer"]]["share"][POS]
        claims.append(
            f"toward code alone (share code, valid text >= 90%): best {best_pos['source']} layer "
            f"{best_pos['layer']} scale {best_pos['scale']:g}: {g:+.2f}: "
            f"{'held' if g >= 0.25 else 'did NOT hold'} "
            "(rise >= 0.25)"
        )
    rel = {
        id(r): (r["loss"][POS] - base[r["source"], r["layer"]]["loss"][POS]) - (r["loss"][NEG] - base[r["source"], r["layer"]]["loss"][NEG])
        for r in rows
        if r["scale"] > 0
    }
    small = [r for r in rows if r["scale"] == SCALES[1]]
    drops = [r["loss"][POS] - base[r["source"], r["layer"]]["loss"][POS] for r in small]
    claims.append(
        f"teacher-forced, smallest scale {SCALES[1]:g}: code loss changes "
        + ", ".join(f"{r['source']} L{r['layer']} {d:+.4f}" for r, d in zip(small, drops))
        + "; code-minus-prose change "
        + ", ".join(f"{rel[id(r)]:+.4f}" for r in small)
        + f": code loss falls in absolute terms: {'held' if any(d < 0 for d in drops) else 'did NOT hold'}"
    )
    claim = "\n- ".join(claims)
    cmd = "python experiments/study_steer.py" + (" --quick" if args.quick else "") + (f" --base {args.base}" if args.base else "")
    text = (
        f"{cmd}  ({datetime.date.today()}, {time.perf_counter() - t0:.0f} s, CPU)\n\n"
        f"classifier accuracy on held-out 48-char chunks: "
        + ", ".join(f"{d} {a:.2f}" for d, a in acc.items())
        + f"\n\nshare of {N_SAMPLES} continuations of BOS ({NEW_TOKENS} tokens, temperature 1) classified per "
        "domain; teacher-forced loss (nats/token) of held-out code / prose text under the same steering"
        f"\n\n{table}\n\n- {claim}\n"
    )
    print("\n" + text)
    (rd / "results.md").write_text(text)
    (rd / "results.json").write_text(json.dumps({"classifier_accuracy": acc, "rows": rows, "claim": claim}, indent=1))


if __name__ == "__main__":
    main()
