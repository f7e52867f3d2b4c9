"""``jaxeff eval``: per-domain eval losses of a run, and named metrics computed from its greedy output.

    jaxeff eval --checkpoint runs/quickstart                                   # per-domain losses
    jaxeff eval --checkpoint runs/quickstart --metric arithmetic_accuracy      # ... then the metric
    jaxeff eval --checkpoint runs/student --metric teacher_match --teacher runs/teacher --examples 64

A metric is a function ``fn(ctx) -> dict[str, float]`` registered by name with :func:`register_metric`,
with the options it reads (``--metric-arg key=value``; ``--examples``, ``--seed`` and ``--teacher`` are
named shortcuts). ``ctx`` (:class:`EvalContext`) holds the run's eval config, the model, its parameters
(the method's prepared tree and ``ctx.apply`` to run it; ``ctx.model_params()`` the plain model's),
the tokenizer, the eval data, the options, and :meth:`EvalContext.greedy` (batched greedy decoding).
Studies call :func:`evaluate_run` instead of copying the evaluation into each study.

Metrics are printed after the per-domain losses (``--no-losses``: instead of them), one ``name value``
per line, and are checked before anything is loaded: an unknown metric or option is one line, exit 2.
Built in: ``arithmetic_accuracy`` (exact greedy answers on fresh generator problems), ``greedy_ref_match``
(greedy continuations vs the eval data's reference continuations), ``teacher_match`` (greedy agreement
with another run). See docs/eval.md.

No jax at module level: this module registers the ``eval`` verb and is imported for every command.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from jaxeff.errors import ConfigError

# fresh arithmetic problems come from this seed offset (train documents: data.seed; eval documents:
# data.seed + 1_000_003, jaxeff.train.inputs.EVAL_SEED_OFFSET), so they are neither
FRESH_SEED_OFFSET = 2_000_029


@dataclasses.dataclass(frozen=True)
class Option:
    type: type
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[["EvalContext"], dict[str, float]]
    help: str
    options: dict[str, Option]


_METRICS: dict[str, Metric] = {}

# modules that register more metrics (light to import: no jax at module level), imported on first use
METRIC_MODULES = ("jaxeff.decode.medusa_cli",)  # acceptance_length
_loaded = False


def load_metrics() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in METRIC_MODULES:
            importlib.import_module(module)


# options every metric reads, with their defaults (the named flags --examples, --seed, --teacher)
COMMON_OPTIONS = {"examples": Option(int, 256, "prompts / problems evaluated"), "seed": Option(int, 0, "which prompts / problems (fresh ones per seed)")}


def register_metric(name: str, *, help: str = "", options: dict[str, Option] | None = None):
    """Register ``fn(ctx) -> dict[str, float]`` as metric ``name``; ``options`` are the
    ``--metric-arg`` keys it reads (besides ``examples`` and ``seed``), each with a type and default."""

    def deco(fn):
        _METRICS[name] = Metric(name, fn, help or (fn.__doc__ or "").strip().split("\n")[0], dict(options or {}))
        return fn

    return deco


def metric_names() -> list[str]:
    load_metrics()
    return sorted(_METRICS)


def check_metrics(names, args: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Check metric names and ``key=value`` options before anything is loaded; returns each chosen
    metric's typed options (its defaults, then the given values; a key goes to every chosen metric
    that reads it and must be read by at least one). One-line ConfigError otherwise."""
    load_metrics()
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise ConfigError(f"--metric: unknown metric '{unknown[0]}' (known: {', '.join(metric_names())})")
    accepted = dict(COMMON_OPTIONS)
    for n in names:
        accepted.update(_METRICS[n].options)
    typed = {}
    for key, raw in args.items():
        if key not in accepted:
            raise ConfigError(
                f"--metric-arg: '{key}' is not an option of {', '.join(names) or 'any metric chosen'} (expected one of {', '.join(sorted(accepted))})"
            )
        opt = accepted[key]
        try:
            typed[key] = opt.type(raw) if raw is not None else None
        except (TypeError, ValueError):
            raise ConfigError(f"--metric-arg {key}: expected {opt.type.__name__} (got {raw!r})") from None
    examples = typed.get("examples", COMMON_OPTIONS["examples"].default)
    if examples is None or examples < 1:
        raise ConfigError(f"--examples: expected a positive number (got {examples})")
    for key in ("new_tokens", "prompt_tokens"):
        if key in typed and (typed[key] is None or typed[key] < 1):
            raise ConfigError(f"--metric-arg {key}: expected a positive number (got {typed[key]})")
    out = {}
    for n in names:
        own = {**COMMON_OPTIONS, **_METRICS[n].options}
        out[n] = {k: typed.get(k, o.default) for k, o in own.items()}
    return out


def parse_metric_args(pairs) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; a pair without ``=`` is a one-line ConfigError."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--metric-arg: expected key=value (got {p!r})")
        out[key.strip()] = value
    return out


@dataclasses.dataclass
class EvalContext:
    """What a metric reads. ``params`` is the prepared tree of the run's method and ``apply`` runs
    the model on it (``Method.run``: adapters, fake or real quantization as trained);
    :meth:`model_params` is the plain model's parameters (``Method.model_params``)."""

    cfg: Any  # the run's eval config (jaxeff.config.ExperimentConfig)
    run: Path  # the checkpoints folder
    step: int | None
    model: Any  # jaxeff.models.Transformer
    params: Any
    apply: Callable[..., Any]
    method: Any  # jaxeff.train.methods.Method
    tokenizer: Any
    eval_sets: dict  # domain -> packed eval arrays (jaxeff.data.packing)
    options: dict[str, Any]  # the options of the metric being computed (see check_metrics)

    def model_params(self):
        return self.method.model_params(self.params)

    def greedy(self, prompts, new_tokens: int, *, model=None, params=None, apply=None, batch: int = 64):
        """Greedy continuations (token id lists, ``new_tokens`` each) of ``prompts`` (token id lists of
        any lengths: grouped by length, run ``batch`` at a time). ``model/params/apply`` default to the
        run's; pass another run's (e.g. a teacher's) to decode with it."""
        return greedy_tokens(
            model or self.model,
            self.params if params is None else params,
            prompts,
            new_tokens,
            apply=apply or (self.apply if model is None else None),
            batch=batch,
        )


def greedy_tokens(model, params, prompts, new_tokens: int, *, apply=None, batch: int = 64) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` (any lengths; rows of one length decode together,
    ``batch`` at a time, the last batch padded by repeating its first row so one shape compiles once)."""
    import jax
    import numpy as np

    from jaxeff.errors import JaxeffError
    from jaxeff.models.generate import generate

    longest = max((len(p) for p in prompts), default=0)
    if longest + new_tokens > model.config.max_seq_len:
        raise JaxeffError(f"eval: a prompt of {longest} tokens + {new_tokens} new tokens exceed the model's max_seq_len={model.config.max_seq_len}")
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch):
            rows = idx[s : s + batch]
            x = np.asarray([prompts[i] for i in rows] + [prompts[rows[0]]] * (min(batch, len(idx)) - len(rows)), np.int32)
            new = np.asarray(generate(model, params, x, jax.random.PRNGKey(0), max_new_tokens=new_tokens, apply_fn=apply))
            for j, i in enumerate(rows):
                out[i] = [int(t) for t in new[j]]
    return out  # type: ignore[return-value]


def until(tokens, stop_ids) -> list[int]:
    """``tokens`` up to (not including) the first of ``stop_ids``."""
    for k, t in enumerate(tokens):
        if t in stop_ids:
            return list(tokens[:k])
    return list(tokens)


# ------------------------------------------------------------------------------------------------ metrics


def arithmetic_prompts(cfg, tokenizer, n: int, seed: int, context: int) -> list[tuple[list[int], str]]:
    """``n`` fresh ``(prompt token ids, answer)`` pairs from the arithmetic generator
    (jaxeff.data.synthetic), seeded apart from the run's train and eval documents. A run of method
    ``step_by_step`` is asked in its own format (``<label_prefix>a+b=``, see
    :func:`jaxeff.distill.step_by_step.label_prompts`); any other run sees lines as the arithmetic
    domain writes them: the last ``context`` characters of a document up to and including an ``=``."""
    import numpy as np

    from jaxeff.data.synthetic import generate_documents

    if cfg.method == "step_by_step":
        from jaxeff.distill.step_by_step import label_prompts

        return label_prompts(getattr(cfg, "step_by_step"), tokenizer, n, cfg.data.seed + FRESH_SEED_OFFSET + seed)
    fresh = cfg.data.seed + FRESH_SEED_OFFSET + seed
    doc_len = max(cfg.data.doc_len or 1000, 2 * context)
    spots: list[tuple[str, int]] = []
    n_docs = 0
    while len(spots) < 4 * n:  # enough lines to choose n from, whatever doc_len is
        n_docs = max(2 * n_docs, 8)
        docs = generate_documents("arithmetic", n_docs, fresh, doc_len=doc_len)
        spots = [(d, e) for d in docs for e in range(context - 1, len(d)) if d[e] == "=" and "\n" in d[e:]]
    order = np.random.default_rng([abs(fresh), 17]).permutation(len(spots))[:n]
    out = []
    for i in order:
        d, e = spots[int(i)]
        out.append((tokenizer.encode(d[e - context + 1 : e + 1]), d[e + 1 : d.index("\n", e)]))
    return out


@register_metric(
    "arithmetic_accuracy",
    help="exact greedy answers to fresh arithmetic problems from the generator",
    options={
        "context": Option(int, 32, "characters of preceding text per problem (not for step_by_step runs)"),
        "new_tokens": Option(int, 12, "greedy tokens decoded per answer"),
    },
)
def arithmetic_accuracy(ctx: EvalContext) -> dict[str, float]:
    """The share of fresh problems whose greedy answer (up to the newline or eos) is exactly right."""
    o = ctx.options
    if o["context"] < 2:
        raise ConfigError(f"--metric-arg context: expected at least 2 characters (got {o['context']})")
    problems = arithmetic_prompts(ctx.cfg, ctx.tokenizer, o["examples"], o["seed"], o["context"])
    outs = ctx.greedy([p for p, _ in problems], o["new_tokens"])
    stop = {ctx.tokenizer.eos_id, *ctx.tokenizer.encode("\n")}
    right = [ctx.tokenizer.decode(until(out, stop)) == answer for out, (_, answer) in zip(outs, problems)]
    return {"arithmetic_accuracy": sum(right) / len(right), "arithmetic_problems": len(right)}


def reference_windows(eval_sets: dict, n: int, prompt_tokens: int, new_tokens: int, seed: int):
    """``n`` ``(prompt, reference)`` token windows from the packed eval data: ``prompt_tokens`` tokens
    and the ``new_tokens`` that follow them in the same document segment, spread over the domains."""
    import numpy as np

    width = prompt_tokens + new_tokens
    seq_len = min(int(np.asarray(a["inputs"]).shape[1]) for a in eval_sets.values()) if eval_sets else 0
    if width > seq_len:
        raise ConfigError(
            f"eval: prompt_tokens + new_tokens = {width} tokens do not fit in one eval row of "
            f"data.seq_len={seq_len}; lower them (--metric-arg prompt_tokens=8 new_tokens=8)"
        )
    spots = []
    for name in sorted(eval_sets):
        seg = np.asarray(eval_sets[name]["segment_ids"])
        inputs = np.asarray(eval_sets[name]["inputs"])
        ok = seg[:, : seg.shape[1] - width + 1] > 0
        for k in range(1, width):  # the whole window within one segment
            ok &= seg[:, k : seg.shape[1] - width + 1 + k] == seg[:, : seg.shape[1] - width + 1]
        rows, starts = np.nonzero(ok)
        spots += [(inputs, int(r), int(s)) for r, s in zip(rows, starts)]
    if not spots:
        raise ConfigError(f"eval: no eval document segment holds {width} tokens (prompt_tokens + new_tokens); lower them or raise data.seq_len")
    pick = np.random.default_rng(seed).choice(len(spots), size=n, replace=len(spots) < n)
    return [
        (
            spots[i][0][spots[i][1], spots[i][2] : spots[i][2] + prompt_tokens].tolist(),
            spots[i][0][spots[i][1], spots[i][2] + prompt_tokens : spots[i][2] + width].tolist(),
        )
        for i in pick
    ]


def _match(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of equal tokens position by position, mean share of the common prefix)."""
    import numpy as np

    eq = np.asarray(a) == np.asarray(b)
    return float(eq.mean()), float(np.cumprod(eq, axis=1).sum(1).mean() / eq.shape[1])


_WINDOW = {"prompt_tokens": Option(int, 16, "prompt tokens per eval window"), "new_tokens": Option(int, 24, "greedy tokens compared per window")}


@register_metric("greedy_ref_match", options=_WINDOW)
def greedy_ref_match(ctx: EvalContext) -> dict[str, float]:
    """Greedy continuations of eval-data windows vs the data's own continuation: the share of equal
    tokens (``greedy_ref_match``) and of the common prefix (``greedy_ref_prefix``)."""
    o = ctx.options
    windows = reference_windows(ctx.eval_sets, o["examples"], o["prompt_tokens"], o["new_tokens"], o["seed"])
    out = ctx.greedy([p for p, _ in windows], o["new_tokens"])
    tokens, prefix = _match(out, [r for _, r in windows])
    return {"greedy_ref_match": tokens, "greedy_ref_prefix": prefix}


@register_metric("teacher_match", options={**_WINDOW, "teacher": Option(str, None, "the teacher's run folder")})
def teacher_match(ctx: EvalContext) -> dict[str, float]:
    """Greedy agreement with another run (``--teacher RUN``) on eval-data windows: the share of equal
    tokens (``teacher_match``) and of the common prefix (``teacher_prefix``)."""
    from jaxeff.models import Transformer
    from jaxeff.runs import load_model_params

    o = ctx.options
    if not o["teacher"]:
        raise ConfigError("--teacher: teacher_match needs the teacher's run folder, e.g. --teacher runs/teacher")
    t_cfg, t_params = load_model_params(o["teacher"])
    if t_cfg.model.vocab_size != ctx.cfg.model.vocab_size:
        raise ConfigError(
            f"--teacher: its vocab_size is {t_cfg.model.vocab_size}, the run's is {ctx.cfg.model.vocab_size}; greedy outputs are compared token by token"
        )
    windows = reference_windows(ctx.eval_sets, o["examples"], o["prompt_tokens"], o["new_tokens"], o["seed"])
    prompts = [p for p, _ in windows]
    out = ctx.greedy(prompts, o["new_tokens"])
    t_out = ctx.greedy(prompts, o["new_tokens"], model=Transformer(t_cfg.model), params=t_params)
    tokens, prefix = _match(out, t_out)
    return {"teacher_match": tokens, "teacher_prefix": prefix}


# ------------------------------------------------------------------------------------------ running them


def evaluate_run(checkpoint, metrics=(), *, step: int | None = None, config=None, overrides=(), losses: bool = True, **options) -> dict[str, float]:
    """Per-domain eval losses (``losses``) and the named ``metrics`` of a run folder, as one dict:
    what ``jaxeff eval`` prints. ``options`` are the metrics' options (``examples=64, teacher=...``)."""
    opts = check_metrics(list(metrics), {k: None if v is None else str(v) for k, v in options.items()})
    ctx, evaluate = _load(checkpoint, step, config, overrides)
    result = evaluate() if losses else {}
    for name in metrics:
        result.update(run_metric(name, ctx, opts[name]))
    return result


def run_metric(name: str, ctx: EvalContext, options: dict[str, Any]) -> dict[str, float]:
    """Metric ``name`` on ``ctx`` with its ``options`` (one entry of :func:`check_metrics`' result)."""
    return _METRICS[name].fn(dataclasses.replace(ctx, options=options))


def _load(checkpoint, step, config, overrides):
    from jaxeff.cli import eval_config
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import find_checkpoint_dir
    from jaxeff.train.inputs import build_data
    from jaxeff.train.loop import load_params

    ckpt_dir = find_checkpoint_dir(checkpoint)
    cfg = eval_config(read_config(ckpt_dir, step), config, list(overrides))
    _, _, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    trainer, params = load_params(cfg, ckpt_dir, step)
    ctx = EvalContext(
        cfg=cfg,
        run=Path(ckpt_dir),
        step=step,
        model=trainer.model,
        params=params,
        apply=trainer.method.run,
        method=trainer.method,
        tokenizer=load_tokenizer(cfg.data.tokenizer),
        eval_sets=eval_sets,
        options={},
    )
    return ctx, lambda: trainer.evaluate(params, eval_sets, cfg.train.eval_batches)


def register(sub) -> None:
    e = sub.add_parser("eval", help="per-domain eval loss of a checkpoint, and named metrics (--metric)")
    e.add_argument("config", nargs="?", default=None, help="optional YAML file whose data section (and train.eval_batches) replace the run's own")
    e.add_argument("overrides", nargs="*", default=[], help="dotted overrides of data/eval settings, e.g. data.seq_len=64")
    e.add_argument("--checkpoint", required=True, help="run folder or its checkpoints folder")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument(
        "--metric", action="append", default=[], metavar="NAME", help="a named metric, printed after the losses (repeatable): " + ", ".join(metric_names())
    )
    e.add_argument(
        "--metric-arg", action="append", default=[], metavar="KEY=VALUE", help="an option of the chosen metrics, e.g. new_tokens=16 (repeatable)"
    )
    e.add_argument("--examples", type=int, default=None, help="prompts / problems per metric (default 256)")
    e.add_argument("--seed", type=int, default=None, help="which prompts / problems (default 0)")
    e.add_argument("--teacher", default=None, metavar="RUN", help="the other run of teacher_match")
    e.add_argument("--no-losses", dest="losses", action="store_false", help="print only the metrics, not the per-domain losses")
    e.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # `eval --checkpoint RUN data.seq_len=64`
    if not args.losses and not args.metric:
        raise ConfigError("--no-losses: nothing to print without a --metric")
    named = {k: getattr(args, k) for k in ("examples", "seed", "teacher") if getattr(args, k) is not None}
    raw = {**parse_metric_args(args.metric_arg), **{k: str(v) for k, v in named.items()}}
    options = check_metrics(args.metric, raw)  # before anything is loaded
    ctx, evaluate = _load(args.checkpoint, args.step, config, overrides)
    result = evaluate() if args.losses else {}
    for k, v in result.items():
        print(f"{k:32s} {v:.4f}")
    for name in args.metric:
        for k, v in run_metric(name, ctx, options[name]).items():
            print(f"{k:32s} {v}" if isinstance(v, int) else f"{k:32s} {v:.4f}")
    return 0


__all__ = [
    "register_metric",
    "metric_names",
    "check_metrics",
    "EvalContext",
    "Option",
    "evaluate_run",
    "run_metric",
    "greedy_tokens",
    "arithmetic_prompts",
    "reference_windows",
    "FRESH_SEED_OFFSET",
]
