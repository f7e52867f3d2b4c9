"""Prefill latency per token vs context length: full attention, sliding window, TTT-E2E.

Prefill = reading a prompt of L tokens before generating: for the Transformer, one forward pass
that fills the KV cache (as ``jaxeff.models.generate`` does it); for TTT-E2E,
``jaxeff.ttt.prefill`` (prefix blocks once over the prompt, then the inner loop: one SGD step on
the fast weights per b tokens, suffix blocks chunk by chunk with a KV buffer of the last k tokens).
Parameters are random (latency does not depend on training).

TTT-E2E is timed as configured (fast MLPs in the last quarter of the blocks; the blocks before them
run over the whole prompt with the model's attention) and with every block chunked
(``ttt.fast_fraction=1``), which isolates the cost of the chunked inner loop.

Checks correctness first, at the shortest length: every output finite; the Transformer's cached
prefill gives the logits of the plain forward pass; TTT-E2E's prefill logits give the per-token
losses of ``jaxeff.ttt.token_losses``. Then times each (model, L): jit, one warm-up call,
``block_until_ready``, median of ``--repeats`` calls; prints ms per token and the ratio to the
shortest length (1.00 everywhere = constant time per token).

Note: the ``xla`` attention runs causal sliding-window self-attention banded (O(L * k)) once the
sequence is at least 4 windows long (``jaxeff.models.attention.BANDED_MIN_RATIO``, commit 0810a75);
since c182c11 the Transformer's cached prefill into an empty cache takes it too (it had computed the
full L x L masked scores against the cache). The row "sliding window, plain forward (no cache)"
stays as the reference for that path. TTT-E2E's prefix blocks run without a cache. On GPU
``--attention auto`` picks cuDNN (``local_window_size``) for full sequences.

    python experiments/bench_ttt_latency.py                       # CPU: 256 .. 4096 tokens
    python experiments/bench_ttt_latency.py --lengths 256 512 1024 2048 4096 8192 --model 125m   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import from_dict
from jaxeff.models import Transformer, init_params
from jaxeff.models.transformer import init_cache
from _common import token_nll

MODELS = {
    "small": dict(vocab_size=264, d_model=256, n_layers=4, n_heads=4, d_ff=768),
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2560),
}


def experiment(args, window, method="lm", ttt=None):
    model = {**MODELS[args.model], "max_seq_len": max(args.lengths), "sliding_window": window, "attention_impl": args.attention, "dtype": args.dtype}
    raw = {
        "name": "bench",
        "method": method,
        "model": model,
        "data": {"seq_len": args.mini_batch * max(1, max(args.lengths) // args.mini_batch), "batch_size": 1},
        "ttt": {"mini_batch": args.mini_batch, **(ttt or {})},
    }
    return from_dict(raw)


@functools.partial(jax.jit, static_argnums=0)
def transformer_prefill(model, params, tokens):
    out = model.apply({"params": params}, tokens, cache=init_cache(model.config, tokens.shape[0], tokens.shape[1]))
    return out.logits, out.cache


@functools.partial(jax.jit, static_argnums=0)
def transformer_forward(model, params, tokens):
    return model.apply({"params": params}, tokens).logits


def nll(logits, tokens):
    return token_nll(logits[:, :-1], tokens[:, 1:])


def build(args):
    """``{name: (prefill(tokens) -> outputs, check(tokens) -> max abs error)}``."""
    import jaxeff.ttt as ttt
    from jaxeff.ttt.model import add_fast_params

    key = jax.random.key(0)
    runs = {}
    for name, window in (("full attention", None), (f"sliding window k={args.window}", args.window)):
        cfg = experiment(args, window)
        model = Transformer(cfg.model)
        params = jax.jit(init_params, static_argnums=(0, 2))(model, key, (1, 8))

        def check(tokens, model=model, params=params):
            logits, _ = transformer_prefill(model, params, tokens)
            ref = transformer_forward(model, params, tokens)
            assert bool(jnp.isfinite(logits).all()), "non-finite prefill logits"
            return float(jnp.abs(logits - ref).max())

        runs[name] = (functools.partial(transformer_prefill, model, params), check)
        if window is not None:
            # the same model's plain forward pass (no KV cache): the reference for the banded path,
            # which the cached prefill above takes too when it starts from an empty cache (c182c11)
            def check_fwd(tokens, model=model, params=params):
                logits = transformer_forward(model, params, tokens)
                ref, _ = transformer_prefill(model, params, tokens)
                assert bool(jnp.isfinite(logits).all()), "non-finite forward logits"
                return float(jnp.abs(logits - ref).max())

            runs[f"{name}, plain forward (no cache)"] = (functools.partial(transformer_forward, model, params), check_fwd)

    # as configured (fast MLPs in the last quarter: the blocks before run over the whole prompt),
    # and with every block chunked (ttt.fast_fraction=1: no prefix), which isolates the inner loop
    for label, extra in (("", None), (", every block chunked", {"fast_fraction": 1.0})):
        cfg = experiment(args, args.window, "ttt_e2e", extra)
        spec = ttt.spec_of(cfg)
        base = jax.jit(init_params, static_argnums=(0, 2))(Transformer(cfg.model), key, (1, 8))
        params = jax.jit(add_fast_params, static_argnums=0)(spec, base, jax.random.key(1))

        def check_ttt(tokens, cfg=cfg, params=params):
            logits, state = ttt.prefill(cfg, params, tokens)
            assert bool(jnp.isfinite(logits).all()), "non-finite TTT-E2E prefill logits"
            return float(jnp.abs(nll(logits, tokens) - ttt.token_losses(cfg, params, tokens)).max())

        runs[f"TTT-E2E k={args.window}, b={args.mini_batch}{label}"] = (lambda t, cfg=cfg, params=params: ttt.prefill(cfg, params, t), check_ttt)
    return runs


def time_call(fn, tokens, repeats):
    jax.block_until_ready(fn(tokens))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(tokens))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (tokens)")
    ap.add_argument("--window", type=int, default=256, help="sliding window k (window model and TTT-E2E)")
    ap.add_argument("--mini-batch", type=int, default=64, help="TTT-E2E tokens per inner step (b <= k)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    ap.add_argument(
        "--only", nargs="+", default=None, metavar="TEXT", help="time only the rows whose name contains one of these strings (default: all rows)"
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    ap.add_argument(
        "--check-tol",
        type=float,
        default=None,
        help="max abs error allowed in the correctness checks (default 2e-3 for float32 on CPU; 0.1 on "
        "GPU/TPU, where float32 matmuls may run at TF32/bf16 precision, and for bfloat16)",
    )
    args = ap.parse_args(argv)
    if args.lengths is None:
        args.lengths = [256, 512, 1024, 2048, 4096] if jax.default_backend() == "cpu" else [256, 512, 1024, 2048, 4096, 8192]
    args.lengths = sorted(args.lengths)
    if args.check_tol is None:
        args.check_tol = 2e-3 if jax.default_backend() == "cpu" and args.dtype == "float32" else 0.1
    if args.lengths[0] < 2:
        ap.error("--lengths: every prompt needs at least 2 tokens")

    runs = build(args)
    if args.only:
        runs = {n: r for n, r in runs.items() if any(s in n for s in args.only)}
        if not runs:
            ap.error("--only: no row name contains " + ", ".join(map(repr, args.only)))
    rng = np.random.default_rng(0)
    vocab = MODELS[args.model]["vocab_size"]
    prompts = {L: jnp.asarray(rng.integers(0, vocab, (args.batch, L)), jnp.int32) for L in args.lengths}

    short = prompts[args.lengths[0]]
    for name, (_, check) in runs.items():
        err = check(short)
        status = "ok" if err <= args.check_tol else "FAILED"
        print(f"check {name} at L={args.lengths[0]}: max abs error {err:.2e} ({status})", flush=True)
        if err > args.check_tol:
            raise SystemExit(f"correctness check failed for {name}: {err:.3g} > --check-tol {args.check_tol}")

    rows = []
    for name, (fn, _) in runs.items():
        base = None
        for L in args.lengths:
            t = time_call(fn, prompts[L], args.repeats)
            per_tok = t / (args.batch * L) * 1e3
            base = base or per_tok
            rows.append((name, L, t * 1e3, per_tok, per_tok / base))
            print(f"  {name} L={L}: {t * 1e3:.1f} ms", flush=True)

    dev = jax.devices()[0]
    print()
    print(
        f"# bench_ttt_latency {datetime.date.today()} on {dev.device_kind} ({jax.default_backend()}); model "
        f"{args.model} ({args.dtype}), attention {args.attention}, batch {args.batch}, median of {args.repeats}"
    )
    print("| model | L (tokens) | prefill (ms) | ms / token | vs shortest L |")
    print("|---|---|---|---|---|")
    for name, L, t, per_tok, ratio in rows:
        print(f"| {name} | {L} | {t:.1f} | {per_tok:.4f} | {ratio:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
