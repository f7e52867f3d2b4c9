"""Study: speculative decoding with a distilled draft -- acceptance rate and speed-up vs plain decoding.

1. train a target (configs/distill/teacher.yaml) on the embedded synthetic corpus;
2. distill a small draft from it (configs/distill/student_kd.yaml with ``--draft-layers`` layers;
   same vocabulary and tokenizer);
3. prompts: the first ``--prompt-len`` tokens of held-out (eval) documents, ``--prompts`` per domain;
4. correctness first: greedy speculative output must equal the target's greedy output (plain
   :func:`jaxeff.models.generate.generate`) token for token on every prompt (the study stops if not);
5. for greedy and sampled (temperature 1) decoding and each gamma: acceptance rate, new tokens per
   target call, wall-clock per generated token (median of ``--repeats`` timed runs per prompt, after
   a compile run; plain and speculative runs alternate so that load from other processes hits both)
   and the speed-up over plain decoding with the target (wall-clock, and process CPU time, which a
   shared machine disturbs less); one table. The cost ratio ``c`` of a draft step to a target step
   (plain decoding with each) gives the speed-up to expect, ``tokens per target call / (gamma c + 1)``.

Everything runs on ``jax.devices()[0]`` (CPU here; the same script runs on a GPU unchanged).
Batch 1 (one sequence), as the speculative decoder supports.

TensorBoard: <run-dir>/speculative_study[_quick]/{target, draft_kd, decode/<mode>_gamma<g>} (deleted and
rewritten on every run): the two training runs, and per decoding setting ``decode/*`` scalars.

    python experiments/study_speculative.py --quick     # <= 5 min on a 2-core CPU
    python experiments/study_speculative.py             # the configs' sizes, more gammas
    tensorboard --logdir runs/speculative_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = REPO / "configs" / "distill"
QUICK = ["data.seq_len=64", "data.docs_per_domain=300", "data.eval_docs_per_domain=16", "train.eval_batches=2"]


def train(yaml_name: str, overrides: list[str]):
    from jaxeff.config import load_config
    from jaxeff.train.loop import run_training

    cfg = load_config(CONFIGS / yaml_name, overrides)
    shutil.rmtree(cfg.run_path, ignore_errors=True)
    t0 = time.perf_counter()
    out = run_training(cfg)
    print(f"  {cfg.name}: {cfg.model.n_layers} layers, {cfg.model.param_count():,} params, {cfg.train.steps} steps, "
          f"eval loss {out['eval/loss']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    return cfg, out


def _train_both(common, study, t_steps, d_steps, draft_layers):
    train("teacher.yaml", [*common, "name=target", f"train.steps={t_steps}", f"train.eval_every={t_steps}",
                           f"checkpoint.every={t_steps}"])
    train("student_kd.yaml", [*common, "name=draft_kd", f"model.n_layers={draft_layers}",
                              f"distill.teacher_checkpoint={study / 'target'}", f"train.steps={d_steps}",
                              f"train.eval_every={d_steps}", f"checkpoint.every={d_steps}"])


def prompts(cfg, per_domain: int, length: int):
    """``[(domain, [1, length] int32)]``: the first tokens of eval documents of every domain."""
    import numpy as np

    from jaxeff.train.inputs import build_data

    _, _, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    out = []
    for dom, arrays in eval_sets.items():
        rows = [r for r in range(arrays["inputs"].shape[0])
                if arrays["positions"][r, 0] == 0 and (arrays["segment_ids"][r, :length] == 1).all()]
        for r in rows[:per_domain]:
            out.append((dom, np.asarray(arrays["inputs"][r:r + 1, :length], np.int32)))
    return out


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall-clock, process CPU) seconds of ``fn_a()`` and of ``fn_b()`` (results blocked on),
    timed alternately so that load from other processes hits both alike; one untimed call each first."""
    import jax
    import numpy as np

    jax.block_until_ready(fn_a())
    jax.block_until_ready(fn_b())
    ts = {0: [], 1: []}
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            ts[i].append((time.perf_counter() - w0, time.process_time() - c0))
    med = [tuple(float(x) for x in np.median(np.asarray(ts[i]), axis=0)) for i in (0, 1)]
    return med[0], med[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short training, fewer prompts and gammas (<= 5 min CPU)")
    ap.add_argument("--run-dir", default=str(REPO / "runs"))
    ap.add_argument("--target-steps", type=int, default=None)
    ap.add_argument("--draft-steps", type=int, default=None)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--gammas", default=None, help="comma-separated (default 2,4; full: 1,2,4,6)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per domain (default 1; full: 2)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 48; full 96)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reuse", action="store_true", help="keep the trained target/draft runs of an earlier run")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.decode.cli import load_run
    from jaxeff.decode.speculative import speculative_generate
    from jaxeff.models.generate import generate

    study = Path(args.run_dir) / ("speculative_study_quick" if args.quick else "speculative_study")
    t_steps = args.target_steps or (200 if args.quick else 600)
    d_steps = args.draft_steps or (150 if args.quick else 300)
    gammas = [int(g) for g in (args.gammas or ("2,4" if args.quick else "1,2,4,6")).split(",")]
    per_domain = args.prompts or (1 if args.quick else 2)
    new_tokens = args.new_tokens or (48 if args.quick else 96)
    common = [f"logging.run_dir={study}", "logging.progress=false", "checkpoint.keep=1", *(QUICK if args.quick else [])]
    t_wall = time.perf_counter()
    shutil.rmtree(study / "decode", ignore_errors=True)
    if not (args.reuse and (study / "draft_kd" / "checkpoints").is_dir()):
        shutil.rmtree(study, ignore_errors=True)
        print("training", flush=True)
        _train_both(common, study, t_steps, d_steps, args.draft_layers)

    t_cfg, t_tr, t_params = load_run(study / "target")
    d_cfg, d_tr, d_params = load_run(study / "draft_kd")
    target, draft = t_tr.model, d_tr.model
    cases = prompts(t_cfg, per_domain, args.prompt_len)
    print(f"{len(cases)} prompts of {args.prompt_len} tokens, {new_tokens} new tokens each", flush=True)

    def plain(prompt, temperature, seed=0):
        return generate(target, t_params, prompt, jax.random.PRNGKey(seed), max_new_tokens=new_tokens,
                        temperature=temperature)

    def spec(prompt, gamma, temperature, seed=0):
        return speculative_generate(target, t_params, draft, d_params, prompt, jax.random.PRNGKey(seed),
                                    max_new_tokens=new_tokens, gamma=gamma, temperature=temperature)

    # 4. correctness first
    for dom, prompt in cases:
        ref = np.asarray(plain(prompt, 0.0))
        for g in gammas:
            out = np.asarray(spec(prompt, g, 0.0)[0])
            if not (out == ref).all():
                first = int(np.argmax(out[0] != ref[0]))
                raise SystemExit(f"correctness check FAILED: greedy speculative (gamma {g}) differs from the target's "
                                 f"greedy output on a {dom} prompt at new token {first}")
    print(f"correctness: greedy speculative == target greedy on all {len(cases)} prompts, gammas {gammas}", flush=True)

    # cost of one draft step relative to one target step, from plain decoding with each model
    def plain_draft(prompt):
        return generate(draft, d_params, prompt, jax.random.PRNGKey(0), max_new_tokens=new_tokens)

    pairs = [timed_pair(lambda p=p: plain(p, 0.0), lambda p=p: plain_draft(p), args.repeats) for _, p in cases]
    cost_ratio = sum(b[0] for _, b in pairs) / sum(a[0] for a, _ in pairs)
    print(f"draft step / target step (plain greedy decoding, wall-clock): {cost_ratio:.2f}", flush=True)

    # 5. acceptance and speed
    rows = []
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        for g in gammas:
            plain_t, spec_t, acc, drafted, calls, generated = [], [], 0, 0, 0, 0
            for i, (_, p) in enumerate(cases):
                a, b = timed_pair(lambda p=p, i=i: plain(p, temperature, i),
                                  lambda p=p, i=i: spec(p, g, temperature, i), args.repeats)
                plain_t.append(a)
                spec_t.append(b)
                st = jax.device_get(spec(p, g, temperature, i)[1])
                acc, drafted = acc + int(st["accepted"]), drafted + int(st["drafted"])
                calls, generated = calls + int(st["target_calls"]), generated + int(st["generated"])
            pw, pc = (sum(x[k] for x in plain_t) for k in (0, 1))
            sw, sc = (sum(x[k] for x in spec_t) for k in (0, 1))
            n_tok = len(cases) * new_tokens
            row = {"mode": mode, "gamma": g, "acceptance_rate": acc / drafted, "tokens_per_call": generated / calls,
                   "target_calls": calls, "plain_ms_tok": 1e3 * pw / n_tok, "spec_ms_tok": 1e3 * sw / n_tok,
                   "speedup": pw / sw, "speedup_cpu": pc / sc,
                   "predicted": (generated / calls) / (g * cost_ratio + 1)}
            rows.append(row)
            with SummaryWriter(str(study / "decode" / f"{mode}_gamma{g}")) as w:
                for k in ("acceptance_rate", "tokens_per_call", "plain_ms_tok", "spec_ms_tok", "speedup", "speedup_cpu",
                          "predicted"):
                    w.add_scalar(f"decode/{k}", row[k], g)
            print(f"  {mode:7s} gamma {g}: acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_call']:.2f} "
                  f"tokens/target call, speed-up {row['speedup']:.2f}x wall, {row['speedup_cpu']:.2f}x CPU time",
                  flush=True)

    dev = jax.devices()[0]
    print()
    print(f"{datetime.date.today()}, {dev.device_kind} ({dev.platform}); target {t_cfg.model.n_layers} layers "
          f"{t_cfg.model.param_count():,} params, draft (distilled) {d_cfg.model.n_layers} layer(s) "
          f"{d_cfg.model.param_count():,} params; {len(cases)} prompts x {new_tokens} new tokens; "
          f"median of {args.repeats} runs; total {time.perf_counter() - t_wall:.0f} s")
    print("| decoding | gamma | acceptance rate | new tokens / target call | plain ms/token | speculative ms/token "
          "| speed-up (wall) | speed-up (CPU time) | expected from cost ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['gamma']} | {r['acceptance_rate']:.3f} | {r['tokens_per_call']:.2f} | "
              f"{r['plain_ms_tok']:.2f} | {r['spec_ms_tok']:.2f} | **{r['speedup']:.2f}x** | {r['speedup_cpu']:.2f}x | "
              f"{r['predicted']:.2f}x |")
    print(f"cost ratio c = draft step / target step = {cost_ratio:.2f} (plain greedy decoding, wall-clock); "
          "expected speed-up = (new tokens per target call) / (gamma * c + 1), verification counted as one target step")
    best = max(rows, key=lambda r: r["speedup"])
    print()
    print(f"claim: speculative decoding with the distilled draft is faster than plain decoding -- "
          f"{'HELD' if best['speedup'] > 1 else 'DID NOT HOLD'} on {dev.platform} "
          f"(best {best['speedup']:.2f}x: {best['mode']}, gamma {best['gamma']}; "
          f"{sum(r['speedup'] > 1 for r in rows)} of {len(rows)} settings faster)")
    return rows


if __name__ == "__main__":
    main()
