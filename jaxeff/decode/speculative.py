"""Speculative decoding (Leviathan et al., 2023): a small draft model proposes, the target verifies.

One iteration, with ``x`` the tokens so far and the last of them not yet in either KV cache:

1. the draft (its own KV cache) samples ``gamma`` tokens ``d_1..d_gamma`` from ``q_1..q_gamma``,
   one single-token forward pass each;
2. the target scores ``[x_last, d_1, .., d_gamma]`` in ONE forward pass against its KV cache:
   ``p_1..p_{gamma+1}``;
3. ``d_i`` is accepted while ``r_i < p_i(d_i) / q_i(d_i)`` (``r_i ~ U[0, 1)``); at the first
   rejection one token is sampled from ``norm(max(0, p_i - q_i))``; if all ``gamma`` are accepted
   a bonus token is sampled from ``p_{gamma+1}``. Each iteration adds ``accepted + 1`` tokens, and
   every token is distributed exactly as when sampling from the target alone;
4. both caches are rolled back by rewinding their ``index`` to the accepted prefix (entries past
   the index are masked by attention and overwritten later). When all drafts were accepted the
   draft has not yet seen ``d_gamma``: one extra draft step (under ``lax.cond``) writes it.

Greedy mode (``temperature == 0``): the draft proposes its argmax, a draft token is accepted while
it equals the target's argmax, and the correction / bonus token is the target's argmax -- the
output is the target's greedy output token for token.

``temperature`` and ``top_k`` are applied to both models' logits first: "the target's
distribution" is the tempered / top-k one that :func:`jaxeff.models.generate.generate` samples.

Batch size 1 (a prompt ``[1, prompt_len]``): the number of accepted tokens differs between rows,
so a batch would need one cache index per row; the whole loop is one jitted ``lax.while_loop``.

    toks, stats = speculative_generate(target, t_params, draft, d_params, prompt, key,
                                       max_new_tokens=64, gamma=4, temperature=0.0)
    stats["acceptance_rate"], stats["target_calls"]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.models.transformer import init_cache


def _plain_apply(model, params, tokens, **kwargs):
    return model.apply({"params": params}, tokens, **kwargs)


def check_pair(target_cfg, draft_cfg) -> None:
    """A draft must share the target's vocabulary (same token ids, same logits width)."""
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ConfigError(
            f"draft: vocab_size {draft_cfg.vocab_size} differs from the target's {target_cfg.vocab_size} (the draft must use the target's vocabulary)"
        )


def probs(logits: jax.Array, *, temperature: float, top_k: int = 0) -> jax.Array:
    """The sampling distribution ``[..., vocab]`` (float32) of ``logits`` after temperature and top-k."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def _rewind(cache, index):
    return {"index": jnp.asarray(index, jnp.int32), "layers": cache["layers"]}


def accept_or_resample(p: jax.Array, q: jax.Array, drafts: jax.Array, rng) -> tuple[jax.Array, jax.Array]:
    """Leviathan et al.'s acceptance rule for one iteration.

    ``p [gamma + 1, vocab]`` target probabilities, ``q [gamma, vocab]`` draft probabilities,
    ``drafts [gamma]`` the drafted tokens. Returns ``(n_accepted, next_token)``: the drafts
    ``0..n_accepted-1`` are kept and ``next_token`` follows them (a resample from
    ``norm(max(0, p - q))`` at the first rejection, or a bonus token from ``p[gamma]``).
    """
    gamma = drafts.shape[0]
    k_r, k_tok = jax.random.split(rng)
    r = jax.random.uniform(k_r, (gamma,))
    idx = jnp.arange(gamma)
    p_d, q_d = p[idx, drafts], q[idx, drafts]
    ok = r * q_d < p_d  # r < p/q without dividing (q_d > 0: d was drawn from q); p = 0 is never accepted
    n_acc = jnp.argmin(jnp.concatenate([ok, jnp.zeros((1,), bool)]))  # first rejection (gamma if none)
    p_n = p[n_acc]
    q_n = jnp.concatenate([q, jnp.zeros_like(q[:1])])[n_acc]  # q = 0 at the bonus position: sample p
    residual = jnp.maximum(p_n - q_n, 0.0)
    total = residual.sum()
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_n)
    tok = jax.random.categorical(k_tok, jnp.log(residual)).astype(jnp.int32)
    return n_acc.astype(jnp.int32), tok


def accept_greedy(target_logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification: keep drafts while they equal the target's argmax; the next token is
    the target's argmax after them. ``target_logits [gamma + 1, vocab]``."""
    gamma = drafts.shape[0]
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    ok = best[:gamma] == drafts
    n_acc = jnp.argmin(jnp.concatenate([ok, jnp.zeros((1,), bool)])).astype(jnp.int32)
    return n_acc, best[n_acc]


@functools.partial(jax.jit, static_argnames=("target", "draft", "max_new_tokens", "gamma", "temperature", "top_k", "target_apply", "draft_apply"))
def speculative_generate(
    target,
    target_params,
    draft,
    draft_params,
    prompt: jax.Array,
    rng,
    *,
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    target_apply=None,
    draft_apply=None,
):
    """``prompt [1, prompt_len]`` -> ``(tokens [1, max_new_tokens], stats)``.

    ``stats``: ``target_calls`` (verification passes, the prefill not counted), ``draft_calls``
    (single-token draft passes, the prefill not counted), ``drafted`` (= gamma x target_calls),
    ``accepted`` (drafted tokens kept), ``acceptance_rate`` (accepted / drafted) and ``generated``
    (tokens produced, >= max_new_tokens: the last iteration may overshoot; the extra ones are cut),
    ``rejected`` (iterations that ended at a rejected draft) and ``alpha`` (per-position acceptance,
    accepted / (accepted + rejected): drafts after a rejection are never judged, so ``acceptance_rate``
    is lower than ``alpha`` for gamma > 1; ``alpha`` is Leviathan et al.'s acceptance rate).
    ``target_apply`` / ``draft_apply`` replace ``model.apply`` as in :func:`jaxeff.models.generate.generate`.
    """
    if prompt.shape[0] != 1:
        raise ConfigError(f"prompt: speculative decoding takes one sequence (batch 1), got batch {prompt.shape[0]}")
    if gamma < 1:
        raise ConfigError(f"gamma: expected at least 1 drafted token per iteration (got {gamma})")
    check_pair(target.config, draft.config)
    t_apply = target_apply or _plain_apply
    d_apply = draft_apply or _plain_apply
    greedy = temperature == 0.0
    t_len = prompt.shape[1]
    cache_len = t_len + max_new_tokens + gamma + 1
    buf_len = max_new_tokens + gamma + 1

    # prefill all but the last prompt token: it is the pending token of the first iteration
    t_cache = init_cache(target.config, 1, cache_len)
    d_cache = init_cache(draft.config, 1, cache_len)
    if t_len > 1:
        t_cache = t_apply(target, target_params, prompt[:, :-1], cache=t_cache).cache
        d_cache = d_apply(draft, draft_params, prompt[:, :-1], cache=d_cache).cache

    def draft_step(carry, key):
        tok, cache = carry
        out = d_apply(draft, draft_params, tok[None, None], cache=cache)
        logits = out.logits[0, -1]
        if greedy:  # the draft's distribution is not needed
            nxt = jnp.argmax(logits).astype(jnp.int32)
            return (nxt, out.cache), (nxt, ())
        q = probs(logits, temperature=temperature, top_k=top_k)
        nxt = jax.random.categorical(key, jnp.log(q)).astype(jnp.int32)
        return (nxt, out.cache), (nxt, q)

    def iteration(state):
        out_buf, n, last, t_cache, d_cache, rng, calls, accepted, d_calls, rejected = state
        rng, k_draft, k_acc = jax.random.split(rng, 3)
        start = t_cache["index"]  # == d_cache["index"]: position of `last`
        (_, d_cache), (drafts, q) = jax.lax.scan(draft_step, (last, d_cache), jax.random.split(k_draft, gamma))
        t_out = t_apply(target, target_params, jnp.concatenate([last[None], drafts])[None], cache=t_cache)
        logits = t_out.logits[0]  # [gamma + 1, vocab]
        if greedy:
            n_acc, nxt = accept_greedy(logits, drafts)
        else:
            n_acc, nxt = accept_or_resample(probs(logits, temperature=temperature, top_k=top_k), q, drafts, k_acc)
        new = jnp.where(jnp.arange(gamma + 1) < n_acc, jnp.concatenate([drafts, drafts[-1:]]), nxt)
        new = jnp.where(jnp.arange(gamma + 1) <= n_acc, new, 0)
        out_buf = jax.lax.dynamic_update_slice(out_buf, new, (n,))
        # keep [last, d_1..d_n_acc] in both caches; the new pending token is `nxt`
        t_cache = _rewind(t_out.cache, start + 1 + n_acc)
        d_cache = jax.lax.cond(
            n_acc == gamma,
            lambda c: d_apply(draft, draft_params, drafts[-1:][None], cache=_rewind(c, start + gamma)).cache,
            lambda c: _rewind(c, start + 1 + n_acc),
            d_cache,
        )
        d_calls = d_calls + gamma + (n_acc == gamma).astype(jnp.int32)
        rejected = rejected + (n_acc < gamma).astype(jnp.int32)
        return out_buf, n + n_acc + 1, nxt, t_cache, d_cache, rng, calls + 1, accepted + n_acc, d_calls, rejected

    zero = jnp.zeros((), jnp.int32)
    state = (jnp.zeros((buf_len,), jnp.int32), zero, prompt[0, -1].astype(jnp.int32), t_cache, d_cache, rng, zero, zero, zero, zero)
    out_buf, n, _, _, _, _, calls, accepted, d_calls, rejected = jax.lax.while_loop(lambda s: s[1] < max_new_tokens, iteration, state)
    drafted = calls * gamma
    stats = {
        "target_calls": calls,
        "draft_calls": d_calls,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted.astype(jnp.float32) / jnp.maximum(drafted, 1).astype(jnp.float32),
        "generated": n,
        "rejected": rejected,
        "alpha": accepted.astype(jnp.float32) / jnp.maximum(accepted + rejected, 1).astype(jnp.float32),
        "tokens_per_target_call": n.astype(jnp.float32) / jnp.maximum(calls, 1).astype(jnp.float32),
    }
    return out_buf[None, :max_new_tokens], stats


__all__ = ["speculative_generate", "accept_or_resample", "accept_greedy", "probs", "check_pair"]
