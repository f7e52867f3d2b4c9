"""Medusa from the command line: ``jaxeff generate --medusa RUN`` and the ``acceptance_length`` metric
of ``jaxeff eval`` (see docs/medusa.md).

    jaxeff generate --medusa runs/medusa --prompt "12+7=" --max-new-tokens 64
    jaxeff generate --medusa runs/medusa --prompt "def " --medusa-top-k 1,1,1 --compare   # a chain; time plain too
    jaxeff eval --checkpoint runs/medusa --metric acceptance_length --examples 32

No jax at module level: the CLI and ``jaxeff.evals`` import this module for every command.
"""

from __future__ import annotations

import json
import time

from jaxeff.errors import ConfigError
from jaxeff.evals import EvalContext, Option, reference_windows, register_metric


def add_generate_args(g) -> None:
    """The ``--medusa`` options of ``jaxeff generate``."""
    g.add_argument("--medusa", default=None, metavar="RUN", help="decode with the Medusa heads of RUN (a method: medusa run; replaces --checkpoint)")
    g.add_argument(
        "--medusa-top-k", default=None, metavar="K1,K2,...", help="candidates per head (a cartesian tree; default: the run's medusa.top_k / medusa.tree)"
    )
    g.add_argument("--compare", action="store_true", help="with --medusa: print statistics and also time plain decoding (speed-up)")


def parse_top_k(text: str, key: str = "--medusa-top-k") -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(","))
    except ValueError:
        ks = ()
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"{key}: expected positive integers separated by commas, e.g. 4,2,2 (got {text!r})")
    return ks


def load_medusa_run(path, step=None):
    """``(cfg, model, base_params, heads)`` of a ``medusa`` run on one device (batch 1)."""
    from jaxeff.runs import load_run, read_config

    method = read_config(path, step).get("method")
    if method != "medusa":
        raise ConfigError(f"--medusa: '{path}' is a method: {method} run; expected a method: medusa run (train one with configs/decode/medusa.yaml)")
    cfg, trainer, params = load_run(path, step)
    return cfg, trainer.model, params["model"], params["medusa"]


def tree_of(cfg, top_k=None):
    """The decoding tree: ``top_k`` (a cartesian tree) or the run's ``medusa`` section."""
    from jaxeff.decode.medusa import Tree

    return Tree.cartesian(top_k) if top_k else cfg.medusa.make_tree()


def cmd_generate_medusa(args) -> int:
    """``jaxeff generate --medusa RUN ...``: text, and with ``--compare`` one JSON line of statistics."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a positive number (got {args.max_new_tokens})")
    if getattr(args, "checkpoint", None):
        raise ConfigError("--medusa: the Medusa run holds its base model; give --medusa RUN without --checkpoint")
    if getattr(args, "steer_pos", None) or getattr(args, "steer_neg", None) or getattr(args, "steer_vector", None):
        raise ConfigError("--medusa: steering (--steer-*) is not supported with Medusa decoding")
    from jaxeff.data.tokenizer import check_text
    from jaxeff.models.generate import check_sampling, check_seed

    check_text(args.prompt, "--prompt")
    check_sampling(args.temperature, args.top_k, None)
    check_seed(args.seed)
    top_k = parse_top_k(args.medusa_top_k) if getattr(args, "medusa_top_k", None) else None
    import jax
    import numpy as np

    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.decode.medusa import medusa_generate
    from jaxeff.models.generate import generate

    cfg, model, base, heads = load_medusa_run(args.medusa, args.step)
    check_sampling(args.temperature, args.top_k, cfg.model.vocab_size)
    tree = tree_of(cfg, top_k)
    if tree.max_depth > cfg.medusa.n_heads:
        raise ConfigError(f"--medusa-top-k: {tree.max_depth} heads' candidates asked for; the run has medusa.n_heads={cfg.medusa.n_heads}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    if len(ids) + args.max_new_tokens + tree.n_nodes > cfg.model.max_seq_len:
        raise ConfigError(
            f"--prompt/--max-new-tokens: {len(ids)} prompt + {args.max_new_tokens} new + {tree.n_nodes} "
            f"tree tokens exceed the model's max_seq_len={cfg.model.max_seq_len}"
        )
    prompt = np.asarray([ids], np.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    def medusa():
        return medusa_generate(
            model,
            base,
            heads,
            prompt,
            jax.random.PRNGKey(args.seed),
            tree=tree,
            posterior_threshold=cfg.medusa.posterior_threshold,
            posterior_alpha=cfg.medusa.posterior_alpha,
            **kw,
        )

    toks, stats = jax.block_until_ready(medusa())  # compiles
    new = [int(t) for t in np.asarray(toks)[0]]
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new))
    if getattr(args, "compare", False):
        t0 = time.perf_counter()
        jax.block_until_ready(medusa())
        medusa_s = time.perf_counter() - t0

        def plain():
            return generate(model, base, prompt, jax.random.PRNGKey(args.seed), **kw)

        jax.block_until_ready(plain())
        t0 = time.perf_counter()
        jax.block_until_ready(plain())
        plain_s = time.perf_counter() - t0
        report = {k: (round(float(v), 4) if k == "acceptance_length" else int(v)) for k, v in stats.items()}
        report.update(tree_nodes=tree.n_nodes, wall_s=round(medusa_s, 4), plain_wall_s=round(plain_s, 4), speedup=round(plain_s / medusa_s, 3))
        print(json.dumps(report))
    return 0


_OPTIONS = {
    "prompt_tokens": Option(int, 16, "prompt tokens per eval window"),
    "new_tokens": Option(int, 32, "tokens decoded per window"),
    "top_k": Option(str, "", "candidates per head, e.g. 4,2,2 (default: the run's tree)"),
}


@register_metric("acceptance_length", options=_OPTIONS)
def acceptance_length_metric(ctx: EvalContext) -> dict[str, float]:
    """Medusa's mean acceptance length (tokens per model pass, greedy) on eval-data windows; a medusa run only."""
    import jax
    import numpy as np

    from jaxeff.decode.medusa import medusa_generate

    if ctx.cfg.method != "medusa":
        raise ConfigError(f"acceptance_length: needs a method: medusa run (this run's method is {ctx.cfg.method})")
    o = ctx.options
    tree = tree_of(ctx.cfg, parse_top_k(o["top_k"], "--metric-arg top_k") if o["top_k"] else None)
    if tree.max_depth > ctx.cfg.medusa.n_heads:
        raise ConfigError(f"--metric-arg top_k: {tree.max_depth} heads asked for; the run has medusa.n_heads={ctx.cfg.medusa.n_heads}")
    windows = reference_windows(ctx.eval_sets, o["examples"], o["prompt_tokens"], 1, o["seed"])
    generated = calls = 0
    for prompt, _ in windows:
        _, st = medusa_generate(
            ctx.model,
            ctx.params["model"],
            ctx.params["medusa"],
            np.asarray([prompt], np.int32),
            jax.random.PRNGKey(0),
            tree=tree,
            max_new_tokens=o["new_tokens"],
        )
        generated, calls = generated + int(st["generated"]), calls + int(st["calls"])
    return {"acceptance_length": generated / max(calls, 1), "medusa_tree_nodes": tree.n_nodes}


__all__ = ["add_generate_args", "cmd_generate_medusa", "load_medusa_run", "acceptance_length_metric", "tree_of"]
