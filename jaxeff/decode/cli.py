"""``jaxeff speculate``: speculative decoding from two run folders (see docs/decode.md).

    jaxeff speculate --target runs/teacher --draft runs/student_kd --prompt "12+7=" --gamma 4
    jaxeff speculate ... --compare      # also time plain decoding with the target: speed-up

No jax at module level: this module is imported for every ``jaxeff`` command.
"""

from __future__ import annotations

import json
import time

from jaxeff.errors import ConfigError


def register(sub) -> None:
    s = sub.add_parser("speculate", help="speculative decoding: a draft run proposes, the target run verifies")
    s.add_argument("--target", required=True, help="target run folder (or its checkpoints folder)")
    s.add_argument("--draft", required=True, help="draft run folder (same vocabulary and tokenizer)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--gamma", type=int, default=4, help="tokens drafted per target pass")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--compare", action="store_true", help="also time plain decoding with the target (speed-up)")
    s.set_defaults(handler=cmd_speculate)


def cmd_speculate(args) -> int:
    for name in ("gamma", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive number (got {getattr(args, name)})")
    from jaxeff.data.tokenizer import check_text
    from jaxeff.models.generate import check_sampling, check_seed

    check_text(args.prompt, "--prompt")
    check_sampling(args.temperature, args.top_k, None)  # the vocabulary bound once the runs are read
    check_seed(args.seed)
    import jax
    import numpy as np

    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.decode.speculative import check_pair, speculative_generate
    from jaxeff.models.generate import generate
    from jaxeff.runs import load_run  # the method's own tree, run by its trainer's method (a distilled student alone)

    t_cfg, t_trainer, t_params = load_run(args.target)
    d_cfg, d_trainer, d_params = load_run(args.draft)
    check_pair(t_cfg.model, d_cfg.model)
    check_sampling(args.temperature, args.top_k, min(t_cfg.model.vocab_size, d_cfg.model.vocab_size))
    if t_cfg.data.tokenizer != d_cfg.data.tokenizer:
        raise ConfigError(f"--draft: tokenizer {d_cfg.data.tokenizer!r} differs from the target's {t_cfg.data.tokenizer!r}")
    tokenizer = load_tokenizer(t_cfg.data.tokenizer)
    ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    for cfg, which in ((t_cfg, "target"), (d_cfg, "draft")):
        if len(ids) + args.max_new_tokens + args.gamma > cfg.model.max_seq_len:
            raise ConfigError(
                f"--prompt/--max-new-tokens: {len(ids)} prompt + {args.max_new_tokens} new + "
                f"{args.gamma} drafted tokens exceed the {which}'s max_seq_len={cfg.model.max_seq_len}"
            )
    prompt = np.asarray([ids], np.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    def spec():
        return speculative_generate(
            t_trainer.model,
            t_params,
            d_trainer.model,
            d_params,
            prompt,
            jax.random.PRNGKey(args.seed),
            gamma=args.gamma,
            target_apply=t_trainer.method.run,
            draft_apply=d_trainer.method.run,
            **kw,
        )

    toks, stats = jax.block_until_ready(spec())  # compiles
    t0 = time.perf_counter()
    toks, stats = jax.block_until_ready(spec())
    spec_s = time.perf_counter() - t0
    new = [int(t) for t in np.asarray(toks)[0]]
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new))
    report = {k: (round(float(v), 4) if k in ("acceptance_rate", "alpha", "tokens_per_target_call") else int(v)) for k, v in stats.items()}
    report["gamma"] = args.gamma
    report["wall_s"] = round(spec_s, 4)
    if args.compare:

        def plain():
            return generate(t_trainer.model, t_params, prompt, jax.random.PRNGKey(args.seed), apply_fn=t_trainer.method.run, **kw)

        jax.block_until_ready(plain())
        t0 = time.perf_counter()
        jax.block_until_ready(plain())
        plain_s = time.perf_counter() - t0
        report["plain_wall_s"] = round(plain_s, 4)
        report["speedup"] = round(plain_s / spec_s, 3)
    print(json.dumps(report))
    return 0
