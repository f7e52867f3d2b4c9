"""Study: Medusa heads -- acceptance length and speed-up vs plain decoding and vs speculative decoding.

1. train a target (configs/distill/teacher.yaml) and distil a 1-layer draft from it, exactly as
   experiments/study_speculative.py does (``--size large``: its 25M-parameter target, where that study
   found a speed-up for speculative sampling);
2. train Medusa-1 heads on the frozen target (configs/decode/medusa.yaml, ``train.init_from`` the target,
   same data); ``--medusa2`` also trains a Medusa-2 run (heads + backbone);
3. prompts: the first ``--prompt-len`` tokens of held-out documents of every domain;
4. correctness first: greedy Medusa output must equal the target's greedy output on every prompt and
   tree (the study stops if not);
5. for greedy and sampled (temperature 1; Medusa's typical acceptance, speculative's exact rule) decoding:
   for each candidate tree, the acceptance length (tokens per model pass), ms per token and the speed-up
   over plain decoding (median of ``--repeats`` timed runs per prompt after a compile run, alternating);
   the same for speculative decoding at each gamma; the cost ``v`` of one pass over the tree's nodes
   relative to a one-token step, and the speed-up it predicts, acceptance length / v. One table.

Everything runs on ``jax.devices()[0]`` (CPU here; a GPU unchanged). Batch 1.

TensorBoard: <run-dir>/medusa_study[_large][_quick]/{target, draft_kd, medusa1[, medusa2], decode/<row>}.

    python experiments/study_medusa.py --quick            # small target, a few CPU minutes
    python experiments/study_medusa.py --size large       # the 25M target (~20 min on a shared 2-core CPU)
    tensorboard --logdir runs/medusa_study_large
"""

from __future__ import annotations

import argparse
import datetime
import time

import study_speculative as spec  # the same target, draft, prompts and timing helpers
from _common import REPO, train_run, train_steps

MEDUSA_YAML = REPO / "configs" / "decode" / "medusa.yaml"


def train_medusa(common, study, extra, steps: int, mode: str, lr: float):
    cfg, out, wall = train_run(
        MEDUSA_YAML, [*common, *extra, f"name={mode}", f"medusa.mode={mode}", *train_steps(steps), f"optim.lr={lr}", f"train.init_from={study / 'target'}"]
    )
    print(f"  {cfg.name}: {cfg.medusa.n_heads} heads, {steps} steps, eval loss (base) {out['eval/loss']:.3f}, {wall:.0f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec.add_target_draft_args(
        ap, "medusa", "short training, fewer prompts and settings", "small: the configs' 4-layer d_model-128 target; large: study_speculative's 25M target"
    )
    ap.add_argument("--medusa-steps", type=int, default=None)
    ap.add_argument("--medusa-lr", type=float, default=None, help="heads' learning rate (default 3e-3)")
    ap.add_argument("--medusa2", action="store_true", help="also train and measure a Medusa-2 run")
    ap.add_argument("--trees", default=None, help="';'-separated top-k lists (default '1,1,1;2,2,1;4,2,2')")
    ap.add_argument("--gammas", default=None, help="speculative gammas, comma-separated (default 2,4)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per domain")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 48; large 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="keep the trained runs of an earlier run (train only missing ones)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.decode.medusa import Tree, medusa_generate
    from jaxeff.decode.medusa_cli import load_medusa_run
    from jaxeff.decode.speculative import speculative_generate
    from jaxeff.models.generate import generate

    study, large = spec.target_draft_study(args)
    if large:
        m_steps = args.medusa_steps or (60 if args.quick else 200)
        new_tokens = args.new_tokens or (48 if args.quick else 64)
    else:
        m_steps = args.medusa_steps or (150 if args.quick else 300)
        new_tokens = args.new_tokens or 48
    trees = [tuple(int(k) for k in t.split(",")) for t in (args.trees or "1,1,1;2,2,1;4,2,2").split(";")]
    gammas = [int(g) for g in (args.gammas or "2,4").split(",")]
    m_extra = [*spec.LARGE_TARGET, "data.batch_size=8"] if large else []  # the target's shape
    modes = ["medusa1", *(["medusa2"] if args.medusa2 else [])]
    t_wall = time.perf_counter()
    common = spec.train_target_draft(args, study, large)
    for mode in modes:  # with --reuse: only the Medusa runs not trained yet
        if not (args.reuse and (study / mode / "checkpoints").is_dir()):
            train_medusa(common, study, m_extra, m_steps, mode, args.medusa_lr or 3e-3)

    t_cfg, target, t_params, d_cfg, draft, d_params = spec.load_target_draft(study)
    runs = {}
    for mode in modes:
        m_cfg, _, base, heads = load_medusa_run(study / mode)
        runs[mode] = (m_cfg, base, heads)
    cases = spec.prompts(t_cfg, args.prompts, args.prompt_len)
    print(f"{len(cases)} prompts of {args.prompt_len} tokens, {new_tokens} new tokens each", flush=True)

    def plain(params, prompt, temperature, seed=0):
        return generate(target, params, prompt, jax.random.PRNGKey(seed), max_new_tokens=new_tokens, temperature=temperature)

    def medusa(mode, prompt, tree, temperature, seed=0):
        m_cfg, base, heads = runs[mode]
        return medusa_generate(
            target,
            base,
            heads,
            prompt,
            jax.random.PRNGKey(seed),
            tree=tree,
            max_new_tokens=new_tokens,
            temperature=temperature,
            posterior_threshold=m_cfg.medusa.posterior_threshold,
            posterior_alpha=m_cfg.medusa.posterior_alpha,
        )

    def speculative(prompt, gamma, temperature, seed=0):
        return speculative_generate(
            target, t_params, draft, d_params, prompt, jax.random.PRNGKey(seed), max_new_tokens=new_tokens, gamma=gamma, temperature=temperature
        )

    # 4. correctness first: greedy Medusa == greedy decoding of the model the heads sit on
    for mode in modes:
        base = runs[mode][1]
        for dom, prompt in cases:
            ref = np.asarray(plain(base, prompt, 0.0))
            for top_k in trees:
                out = np.asarray(medusa(mode, prompt, Tree.cartesian(top_k), 0.0)[0])
                if not (out == ref).all():
                    first = int(np.argmax(out[0] != ref[0]))
                    raise SystemExit(
                        f"correctness check FAILED: greedy {mode} (tree {top_k}) differs from greedy decoding on a {dom} prompt at new token {first}"
                    )
    print(f"correctness: greedy Medusa == greedy decoding on all {len(cases)} prompts, trees {trees}, {modes}", flush=True)

    # cost v of one pass over N tree nodes relative to a one-token step (the target alone)
    sizes = sorted({Tree.cartesian(t).n_nodes for t in trees} | {g + 1 for g in gammas})
    v = spec.verify_cost(target, t_params, t_cfg.model, args.prompt_len, new_tokens, [n - 1 for n in sizes], args.repeats)
    v = {n: v[n - 1] for n in sizes}
    print("pass over N tokens / one-token step: " + ", ".join(f"N={n}: {v[n]:.2f}" for n in sizes), flush=True)

    rows = []

    def measure(label, method, setting, nodes, temperature, fn_plain, fn_fast):
        plain_t, fast_t, generated, calls = [], [], 0, 0
        for i, (_, p) in enumerate(cases):
            a, b = spec.timed_pair(lambda p=p, i=i: fn_plain(p, i), lambda p=p, i=i: fn_fast(p, i), args.repeats)
            plain_t.append(a)
            fast_t.append(b)
            st = jax.device_get(fn_fast(p, i)[1])
            generated += int(st["generated"])
            calls += int(st["calls"] if "calls" in st else st["target_calls"])
        pw, sw = sum(x[0] for x in plain_t), sum(x[0] for x in fast_t)
        n_tok = len(cases) * new_tokens
        row = {
            "decoding": label,
            "method": method,
            "setting": setting,
            "nodes": nodes,
            "acceptance_length": generated / calls,
            "plain_ms_tok": 1e3 * pw / n_tok,
            "ms_tok": 1e3 * sw / n_tok,
            "speedup": pw / sw,
            "with_v": (generated / calls) / v[nodes] if nodes in v else float("nan"),
        }
        rows.append(row)
        with SummaryWriter(str(study / "decode" / f"{label}_{method}_{setting}".replace(",", "-"))) as w:
            for k in ("acceptance_length", "plain_ms_tok", "ms_tok", "speedup"):
                w.add_scalar(f"decode/{k}", row[k], 0)
        print(
            f"  {label:7s} {method:11s} {setting:10s}: {row['acceptance_length']:.2f} tokens/pass, "
            f"{row['ms_tok']:.2f} vs {row['plain_ms_tok']:.2f} ms/token, speed-up {row['speedup']:.2f}x",
            flush=True,
        )

    for label, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        for mode in modes:
            base = runs[mode][1]
            for top_k in trees:
                tree = Tree.cartesian(top_k)
                measure(
                    label,
                    mode,
                    "x".join(map(str, top_k)),
                    tree.n_nodes,
                    temperature,
                    lambda p, i, b=base: plain(b, p, temperature, i),
                    lambda p, i, m=mode, t=tree: medusa(m, p, t, temperature, i),
                )
        for g in gammas:
            measure(
                label,
                "speculative",
                f"gamma {g}",
                g + 1,
                temperature,
                lambda p, i: plain(t_params, p, temperature, i),
                lambda p, i, g=g: speculative(p, g, temperature, i),
            )

    dev = jax.devices()[0]
    print()
    print(
        f"{datetime.date.today()}, {dev.device_kind} ({dev.platform}); target {t_cfg.model.n_layers} layers "
        f"{t_cfg.model.param_count():,} params; draft {d_cfg.model.param_count():,} params; Medusa "
        f"{runs['medusa1'][0].medusa.n_heads} heads; {len(cases)} prompts x {new_tokens} new tokens; median of "
        f"{args.repeats} runs; total {time.perf_counter() - t_wall:.0f} s"
    )
    print(
        "| decoding | method | tree / gamma | nodes per pass | acceptance length (tokens / pass) | plain ms/token "
        "| ms/token | speed-up (wall) | expected: length / v |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['decoding']} | {r['method']} | {r['setting']} | {r['nodes']} | {r['acceptance_length']:.2f} | "
            f"{r['plain_ms_tok']:.2f} | {r['ms_tok']:.2f} | **{r['speedup']:.2f}x** | {r['with_v']:.2f}x |"
        )
    print("v = one target pass over N tokens / one over 1 token: " + ", ".join(f"N={n}: {v[n]:.2f}" for n in sizes))
    print()
    for label in ("greedy", "sampled"):
        med = [r for r in rows if r["decoding"] == label and r["method"] == "medusa1"]
        spc = [r for r in rows if r["decoding"] == label and r["method"] == "speculative"]
        bm, bs = max(med, key=lambda r: r["speedup"]), max(spc, key=lambda r: r["speedup"])
        print(
            f"claim ({label}): Medusa-1 decodes faster than plain decoding -- "
            f"{'HELD' if bm['speedup'] > 1 else 'DID NOT HOLD'} on {dev.platform} (best {bm['speedup']:.2f}x, tree "
            f"{bm['setting']}, {bm['acceptance_length']:.2f} tokens/pass; {sum(r['speedup'] > 1 for r in med)} of "
            f"{len(med)} trees faster)"
        )
        print(
            f"claim ({label}): Medusa-1 is faster than speculative decoding with the distilled draft -- "
            f"{'HELD' if bm['speedup'] > bs['speedup'] else 'DID NOT HOLD'} (best Medusa {bm['speedup']:.2f}x vs "
            f"best speculative {bs['speedup']:.2f}x at {bs['setting']}; acceptance length "
            f"{bm['acceptance_length']:.2f} vs {bs['acceptance_length']:.2f})"
        )
    if "medusa2" in runs:
        pairs = [
            (a, b)
            for a in rows
            if a["method"] == "medusa1"
            for b in rows
            if b["method"] == "medusa2" and (b["decoding"], b["setting"]) == (a["decoding"], a["setting"])
        ]
        more = sum(b["acceptance_length"] > a["acceptance_length"] for a, b in pairs)
        print(
            f"claim: Medusa-2 (heads + backbone) accepts more tokens per pass than Medusa-1 -- "
            f"{'HELD' if more == len(pairs) else 'DID NOT HOLD'} in {more} of {len(pairs)} settings ("
            + ", ".join(f"{a['decoding']} {a['setting']}: {a['acceptance_length']:.2f} -> {b['acceptance_length']:.2f}" for a, b in pairs)
            + "); note that its backbone also trained further"
        )
    return rows


if __name__ == "__main__":
    main()
