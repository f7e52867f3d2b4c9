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
   (plain decoding with each) gives the speed-up to expect, ``tokens per target call / (gamma c + 1)``,
   and Leviathan et al.'s ``(1 - a^(gamma+1)) / ((1 - a)(gamma c + 1))`` with ``a`` the per-position
   acceptance; the measured cost ``v`` of a verification pass (gamma + 1 tokens) relative to a one-token
   step gives ``tokens per target call / (gamma c + v)``.

``--size large``: a target of d_model 512, 8 layers (~25M parameters) and a d_model-128 1-layer draft,
on the arithmetic / records / code domains, short training (see LARGE_* below; runs/speculative_study_large).

Everything runs on ``jax.devices()[0]`` (CPU here; the same script runs on a GPU unchanged).
Batch 1 (one sequence), as the speculative decoder supports.

TensorBoard: <run-dir>/speculative_study[_quick]/{target, draft_kd, decode/<mode>_gamma<g>} (deleted and
rewritten on every run): the two training runs, and per decoding setting ``decode/*`` scalars.

    python experiments/study_speculative.py --quick     # <= 5 min on a 2-core CPU
    python experiments/study_speculative.py             # the configs' sizes, more gammas
    python experiments/study_speculative.py --size large    # 25M-parameter target, 0.2M draft (~13 min CPU)
    tensorboard --logdir runs/speculative_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
from pathlib import Path

from _common import REPO, add_study_args, quick_data, study_dir, train_run, train_steps

CONFIGS = REPO / "configs" / "distill"
QUICK = quick_data(docs_per_domain=300, eval_batches=2)  # the configs' model sizes
# --size large: a target whose decoding step is dominated by reading its weights (d_model 512, 8 layers, ~25M
# parameters, ~100 MB float32) and a 1-layer d_model-128 draft (~0.2M parameters) distilled from it, on the
# predictable domains; short training at small batch / sequence (the target need not be good, the draft must
# predict it).
LARGE_DATA = [
    "data.domains=[arithmetic,records,code]",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.docs_per_domain=200",
    "data.eval_docs_per_domain=16",
    "train.eval_batches=1",
    "optim.lr=1e-3",
    "optim.warmup_steps=10",
]
LARGE_TARGET = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1536"]
LARGE_DRAFT = ["data.batch_size=8", "optim.lr=3e-3"]


def train(yaml_name: str, overrides: list[str]):
    cfg, out, wall = train_run(CONFIGS / yaml_name, overrides)
    print(
        f"  {cfg.name}: {cfg.model.n_layers} layers, {cfg.model.param_count():,} params, {cfg.train.steps} steps, "
        f"eval loss {out['eval/loss']:.3f}, {wall:.0f} s",
        flush=True,
    )
    return cfg, out


def _train_both(common, study, t_steps, d_steps, draft_layers, t_extra=(), d_extra=()):
    train("teacher.yaml", [*common, *t_extra, "name=target", *train_steps(t_steps)])
    train(
        "student_kd.yaml",
        [*common, *d_extra, "name=draft_kd", f"model.n_layers={draft_layers}", f"distill.teacher_checkpoint={study / 'target'}", *train_steps(d_steps)],
    )


# The set-up this study and study_medusa.py share: flags, folder, the target and its distilled draft.
def add_target_draft_args(ap: argparse.ArgumentParser, name: str, quick_help: str, size_help: str) -> None:
    """``--quick``, ``--run-dir`` (runs in ``<run-dir>/<name>_study[_large][_quick]``), ``--size``,
    ``--target-steps``, ``--draft-steps``."""
    add_study_args(ap, name, quick_help, run_dir_help=f"runs go to <run-dir>/{name}_study[_large][_quick]/")
    ap.add_argument("--size", choices=("small", "large"), default="small", help=size_help)
    ap.add_argument("--target-steps", type=int, default=None, help="default 600 (--quick 200); large 150 (--quick 60)")
    ap.add_argument("--draft-steps", type=int, default=None, help="default 300 (--quick 150); large 250 (--quick 100)")


def target_draft_study(args) -> tuple[Path, bool]:
    """``(study folder, large)`` for flags from :func:`add_target_draft_args`."""
    large = args.size == "large"
    return study_dir(args, variant="_large" if large else ""), large


def train_target_draft(args, study: Path, large: bool, draft_layers: int = 1) -> list[str]:
    """Train the target and distil a ``draft_layers``-layer draft from it into ``study`` (the folder
    deleted first; ``--reuse``: kept when its draft has a checkpoint); ``study/decode`` is always
    deleted. Returns the overrides both runs share (folder, data; later runs on the same data reuse them)."""
    if large:
        t_steps = args.target_steps or (60 if args.quick else 150)
        d_steps = args.draft_steps or (100 if args.quick else 250)
    else:
        t_steps = args.target_steps or (200 if args.quick else 600)
        d_steps = args.draft_steps or (150 if args.quick else 300)
    common = [f"logging.run_dir={study}", "logging.progress=false", "checkpoint.keep=1", *(LARGE_DATA if large else QUICK if args.quick else [])]
    shutil.rmtree(study / "decode", ignore_errors=True)
    if not (args.reuse and (study / "draft_kd" / "checkpoints").is_dir()):
        shutil.rmtree(study, ignore_errors=True)
        print("training", flush=True)
        _train_both(common, study, t_steps, d_steps, draft_layers, *((LARGE_TARGET, LARGE_DRAFT) if large else ((), ())))
    return common


def load_target_draft(study: Path):
    """``(target config, target model, target params, draft config, draft model, draft params)``."""
    from jaxeff.models import Transformer
    from jaxeff.runs import load_model_params

    t_cfg, t_params = load_model_params(study / "target")
    d_cfg, d_params = load_model_params(study / "draft_kd")  # the distilled student's parameters
    return t_cfg, Transformer(t_cfg.model), t_params, d_cfg, Transformer(d_cfg.model), d_params


def prompts(cfg, per_domain: int, length: int):
    """``[(domain, [1, length] int32)]``: the first tokens of eval documents of every domain."""
    import numpy as np

    from jaxeff.train.inputs import build_data

    _, _, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    out = []
    for dom, arrays in eval_sets.items():
        rows = [r for r in range(arrays["inputs"].shape[0]) if arrays["positions"][r, 0] == 0 and (arrays["segment_ids"][r, :length] == 1).all()]
        for r in rows[:per_domain]:
            out.append((dom, np.asarray(arrays["inputs"][r : r + 1, :length], np.int32)))
    return out


def leviathan(alpha: float, gamma: int, c: float) -> float:
    """Expected speed-up of Leviathan et al. (2023), eq. 1 with i.i.d. acceptance ``alpha``:
    ``(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))``."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def verify_cost(model, params, model_cfg, prompt_len: int, new_tokens: int, gammas, repeats: int) -> dict:
    """``{gamma: v}``: median wall-clock of one jitted target pass over ``gamma + 1`` new tokens against a KV cache
    holding ``prompt_len`` tokens, over that of a pass over 1 token (a decoding step); passes interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxeff.models.transformer import init_cache

    cache = init_cache(model_cfg, 1, prompt_len + new_tokens + max(gammas) + 1)
    cache = model.apply({"params": params}, jnp.ones((1, prompt_len), jnp.int32), cache=cache).cache
    fwd = jax.jit(lambda p, toks, c: model.apply({"params": p}, toks, cache=c).logits)
    sizes = sorted({1, *(g + 1 for g in gammas)})
    toks = {t: jnp.ones((1, t), jnp.int32) for t in sizes}
    ts = {t: [] for t in sizes}
    for t in sizes:
        jax.block_until_ready(fwd(params, toks[t], cache))
    for _ in range(3 * repeats):
        for t in sizes:
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, toks[t], cache))
            ts[t].append(time.perf_counter() - t0)
    return {g: float(np.median(ts[g + 1]) / np.median(ts[1])) for g in gammas}


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
    add_target_draft_args(
        ap,
        "speculative",
        "short training, fewer prompts and gammas (<= 5 min CPU)",
        "small: the configs' 4-layer d_model-128 target; large: d_model 512, 8 layers (~25M "
        "parameters), a 1-layer d_model-128 draft, domains arithmetic/records/code (~15 min CPU)",
    )
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--gammas", default=None, help="comma-separated (default 2,4; full: 1,2,4,6)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per domain (default 1; full: 2)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 48; full 96)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per prompt and setting (default 5; large 3)")
    ap.add_argument("--reuse", action="store_true", help="keep the trained target/draft runs of an earlier run")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.decode.speculative import speculative_generate
    from jaxeff.models.generate import generate

    study, large = target_draft_study(args)
    if large:
        gammas = [int(g) for g in (args.gammas or ("2,4" if args.quick else "1,2,4,8")).split(",")]
        per_domain = args.prompts or 1
        new_tokens = args.new_tokens or (48 if args.quick else 64)
    else:
        gammas = [int(g) for g in (args.gammas or ("2,4" if args.quick else "1,2,4,6")).split(",")]
        per_domain = args.prompts or (1 if args.quick else 2)
        new_tokens = args.new_tokens or (48 if args.quick else 96)
    repeats = args.repeats or (3 if large else 5)
    t_wall = time.perf_counter()
    train_target_draft(args, study, large, args.draft_layers)
    t_cfg, target, t_params, d_cfg, draft, d_params = load_target_draft(study)
    cases = prompts(t_cfg, per_domain, args.prompt_len)
    print(f"{len(cases)} prompts of {args.prompt_len} tokens, {new_tokens} new tokens each", flush=True)

    def plain(prompt, temperature, seed=0):
        return generate(target, t_params, prompt, jax.random.PRNGKey(seed), max_new_tokens=new_tokens, temperature=temperature)

    def spec(prompt, gamma, temperature, seed=0):
        return speculative_generate(
            target, t_params, draft, d_params, prompt, jax.random.PRNGKey(seed), max_new_tokens=new_tokens, gamma=gamma, temperature=temperature
        )

    # 4. correctness first
    for dom, prompt in cases:
        ref = np.asarray(plain(prompt, 0.0))
        for g in gammas:
            out = np.asarray(spec(prompt, g, 0.0)[0])
            if not (out == ref).all():
                first = int(np.argmax(out[0] != ref[0]))
                raise SystemExit(
                    f"correctness check FAILED: greedy speculative (gamma {g}) differs from the target's "
                    f"greedy output on a {dom} prompt at new token {first}"
                )
    print(f"correctness: greedy speculative == target greedy on all {len(cases)} prompts, gammas {gammas}", flush=True)

    # cost of one draft step relative to one target step, from plain decoding with each model
    def plain_draft(prompt):
        return generate(draft, d_params, prompt, jax.random.PRNGKey(0), max_new_tokens=new_tokens)

    pairs = [timed_pair(lambda p=p: plain(p, 0.0), lambda p=p: plain_draft(p), repeats) for _, p in cases]
    cost_ratio = sum(b[0] for _, b in pairs) / sum(a[0] for a, _ in pairs)
    t_ms = 1e3 * sum(a[0] for a, _ in pairs) / (len(cases) * new_tokens)
    d_ms = 1e3 * sum(b[0] for _, b in pairs) / (len(cases) * new_tokens)
    print(
        f"plain greedy decoding: target {t_ms:.2f} ms/token, draft {d_ms:.2f} ms/token; draft step / target step (wall-clock): c = {cost_ratio:.3f}",
        flush=True,
    )

    # cost v of a verification pass (gamma + 1 new tokens) relative to a decoding step (1 token), target alone
    verify = verify_cost(target, t_params, t_cfg.model, args.prompt_len, new_tokens, gammas, repeats)
    print("verification pass / decoding step (target, wall-clock): " + ", ".join(f"gamma {g}: {verify[g]:.2f}" for g in gammas), flush=True)

    # 5. acceptance and speed
    rows = []
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        for g in gammas:
            plain_t, spec_t, acc, drafted, calls, generated, rejected = [], [], 0, 0, 0, 0, 0
            for i, (_, p) in enumerate(cases):
                a, b = timed_pair(lambda p=p, i=i: plain(p, temperature, i), lambda p=p, i=i: spec(p, g, temperature, i), repeats)
                plain_t.append(a)
                spec_t.append(b)
                st = jax.device_get(spec(p, g, temperature, i)[1])
                acc, drafted = acc + int(st["accepted"]), drafted + int(st["drafted"])
                calls, generated = calls + int(st["target_calls"]), generated + int(st["generated"])
                rejected += int(st["rejected"])
            pw, pc = (sum(x[k] for x in plain_t) for k in (0, 1))
            sw, sc = (sum(x[k] for x in spec_t) for k in (0, 1))
            n_tok = len(cases) * new_tokens
            row = {
                "mode": mode,
                "gamma": g,
                "acceptance_rate": acc / drafted,
                "tokens_per_call": generated / calls,
                "target_calls": calls,
                "plain_ms_tok": 1e3 * pw / n_tok,
                "spec_ms_tok": 1e3 * sw / n_tok,
                "speedup": pw / sw,
                "speedup_cpu": pc / sc,
                "predicted": (generated / calls) / (g * cost_ratio + 1),
                "alpha": acc / max(acc + rejected, 1),
                "leviathan": leviathan(acc / max(acc + rejected, 1), g, cost_ratio),
                "with_verify": (generated / calls) / (g * cost_ratio + verify[g]),
            }
            rows.append(row)
            with SummaryWriter(str(study / "decode" / f"{mode}_gamma{g}")) as w:
                for k in (
                    "acceptance_rate",
                    "tokens_per_call",
                    "plain_ms_tok",
                    "spec_ms_tok",
                    "speedup",
                    "speedup_cpu",
                    "predicted",
                    "leviathan",
                    "alpha",
                    "with_verify",
                ):
                    w.add_scalar(f"decode/{k}", row[k], g)
            print(
                f"  {mode:7s} gamma {g}: acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_call']:.2f} "
                f"tokens/target call, speed-up {row['speedup']:.2f}x wall, {row['speedup_cpu']:.2f}x CPU time, "
                f"expected {row['leviathan']:.2f}x (Leviathan)",
                flush=True,
            )

    dev = jax.devices()[0]
    print()
    print(
        f"{datetime.date.today()}, {dev.device_kind} ({dev.platform}); target {t_cfg.model.n_layers} layers "
        f"{t_cfg.model.param_count():,} params, draft (distilled) {d_cfg.model.n_layers} layer(s) "
        f"{d_cfg.model.param_count():,} params; {len(cases)} prompts x {new_tokens} new tokens; "
        f"median of {repeats} runs; total {time.perf_counter() - t_wall:.0f} s"
    )
    print(
        "| decoding | gamma | acceptance rate | new tokens / target call | plain ms/token | speculative ms/token "
        "| speed-up (wall) | speed-up (CPU time) | alpha | expected (Leviathan) | expected from cost ratio "
        "| expected with verify cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['gamma']} | {r['acceptance_rate']:.3f} | {r['tokens_per_call']:.2f} | "
            f"{r['plain_ms_tok']:.2f} | {r['spec_ms_tok']:.2f} | **{r['speedup']:.2f}x** | {r['speedup_cpu']:.2f}x | "
            f"{r['alpha']:.3f} | {r['leviathan']:.2f}x | {r['predicted']:.2f}x | {r['with_verify']:.2f}x |"
        )
    print(
        f"plain greedy decoding: target {t_ms:.2f} ms/token, draft {d_ms:.2f} ms/token; cost ratio c = draft step / "
        f"target step = {cost_ratio:.3f} (wall-clock); expected from cost ratio = (new tokens per target call) / "
        "(gamma c + 1); Leviathan = (1 - a^(gamma+1)) / ((1 - a)(gamma c + 1)) with a = alpha, the per-position "
        "acceptance (accepted / (accepted + rejections)); both count a verification pass as one target step; "
        "expected with verify cost = (new tokens per target call) / (gamma c + v), v = one target pass over "
        f"gamma + 1 tokens / one over 1 token: {', '.join(f'{g}: {verify[g]:.2f}' for g in gammas)}"
    )
    best = max(rows, key=lambda r: r["speedup"])
    print()
    print(
        f"claim: speculative decoding with the distilled draft is faster than plain decoding -- "
        f"{'HELD' if best['speedup'] > 1 else 'DID NOT HOLD'} on {dev.platform} "
        f"(best {best['speedup']:.2f}x: {best['mode']}, gamma {best['gamma']}; "
        f"{sum(r['speedup'] > 1 for r in rows)} of {len(rows)} settings faster)"
    )
    return rows


if __name__ == "__main__":
    main()
