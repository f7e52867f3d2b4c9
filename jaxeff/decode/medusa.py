"""Medusa (Cai et al., 2024): extra decoding heads on a frozen (or jointly trained) model, whose
candidates are verified as a tree in one forward pass.

**Heads.** ``K`` heads read the model's last hidden state ``h`` (after the final norm, where the LM
head reads it); head ``k`` (0-based) predicts the token ``k + 2`` positions ahead of the position
that ``h`` belongs to (the LM head itself predicts ``+1``). Each head is ``n_layers`` residual
blocks ``x + SiLU(W x + b)`` (``W``, ``b`` zero-initialised: the block starts as the identity)
followed by a vocabulary projection initialised from the model's LM head (the tied embedding's
transpose, or ``lm_head``). Parameters, stacked over heads: ``w [K, L, d, d]``, ``b [K, L, d]``,
``proj [K, d, vocab]`` (and ``proj_bias [K, vocab]`` when the model has biases).

**Training** (method ``medusa``, config section ``medusa:``; the base comes from ``train.init_from``
as for LoRA): ``medusa1`` trains the heads only on ``sum_k decay^k CE_k`` (the backbone frozen, no
gradient through it); ``medusa2`` trains heads and backbone on ``lm_weight * CE_LM + heads_weight *
sum_k decay^k CE_k``. Evaluation and ``jaxeff generate`` see the (possibly updated) base model.

**Decoding** (:func:`medusa_generate`, batch 1, one jitted ``lax.while_loop``). The state is the
base logits and the heads' logits at the last accepted position. One iteration:

1. the root token is the base's argmax (greedy) or a sample from its tempered / top-k distribution;
2. candidates: the tree (:class:`Tree`) names, for each node at depth ``d``, a rank of head ``d - 1``'s
   top-k; the root and all nodes go through the model in ONE pass against the KV cache, each node
   seeing the cache and its own ancestors (``tree_mask``) at position ``index + depth``;
3. acceptance: a node is accepted when its token is the base's argmax at its parent (greedy: the
   output is the base's greedy decoding token for token) or, for sampling, Medusa's *typical
   acceptance*: ``p_parent(token) > min(posterior_threshold, posterior_alpha * exp(-H(p_parent)))``
   (not an exact sampler, as in the paper); the deepest node whose whole path is accepted wins
   (ties, possible only when sampling: the higher path likelihood);
4. the accepted path's K/V entries are moved to consecutive cache slots and the index advanced;
   its last node's logits and hidden state give the next iteration's root and candidates.

Each iteration adds ``1 + depth`` tokens for one model pass: the *acceptance length* (tokens per
verification pass) is the speed-up's hardware-independent part.

    heads = init_heads(model_cfg, base_params, n_heads=3, n_layers=1)
    toks, stats = medusa_generate(model, base_params, heads, prompt, key, tree=Tree.cartesian((4, 2, 2)),
                                  max_new_tokens=64)
    stats["acceptance_length"]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, field_validator

from jaxeff.errors import ConfigError
from jaxeff.schema import Section
from jaxeff.train.losses import cross_entropy
from jaxeff.train.methods import Method, MethodContext, lm_forward, register_method

# Medusa's typical-acceptance defaults (its evaluate_posterior): epsilon and delta = sqrt(epsilon)
POSTERIOR_THRESHOLD = 0.09
POSTERIOR_ALPHA = 0.3


class MedusaConfig(Section):
    """Medusa heads: their shape, how they are trained and the candidate tree used to decode."""

    n_heads: int = Field(3, gt=0)  # K: head k predicts the token k + 2 positions ahead
    n_layers: int = Field(1, gt=0)  # residual blocks per head
    mode: Literal["medusa1", "medusa2"] = "medusa1"  # medusa1: heads only; medusa2: heads + backbone
    decay: float = Field(0.8, gt=0)  # head k's loss weight is decay**k (the paper's 0.8^k)
    lm_weight: float = Field(1.0, ge=0)  # medusa2: weight of the backbone's next-token loss
    heads_weight: float = Field(0.2, ge=0)  # medusa2: weight of the heads' summed loss (Medusa-2's lambda_0)
    heads_lr_multiplier: float = Field(1.0, gt=0)  # the heads' learning rate = optim.lr x this (Medusa-2's differential rates)
    # the candidate tree: top_k per head (a full cartesian tree of top_k[0] x top_k[1] x ... nodes), or
    # explicit Medusa "choices" (each a path of ranks, e.g. [0], [0, 1], [1]; every prefix present)
    top_k: tuple[int, ...] = (4, 2, 2)
    tree: tuple[tuple[int, ...], ...] | None = None
    posterior_threshold: float = Field(POSTERIOR_THRESHOLD, gt=0, le=1)  # typical acceptance epsilon
    posterior_alpha: float = Field(POSTERIOR_ALPHA, gt=0, le=1)  # typical acceptance delta

    @field_validator("top_k")
    @classmethod
    def _positive(cls, v):
        if not v or any(k < 1 for k in v):
            raise ValueError("expected one positive candidate count per head, e.g. [4, 2, 2]")
        return v

    def make_tree(self) -> "Tree":
        tree = Tree.from_choices(self.tree, "medusa.tree") if self.tree is not None else Tree.cartesian(self.top_k)
        if tree.max_depth > self.n_heads:
            key = "medusa.tree" if self.tree is not None else "medusa.top_k"
            raise ConfigError(f"{key}: the tree is {tree.max_depth} deep but there are only medusa.n_heads={self.n_heads} heads (one per depth)")
        return tree


# ------------------------------------------------------------------------------------------------
# the candidate tree


@dataclasses.dataclass(frozen=True)
class Tree:
    """A Medusa candidate tree: ``choices`` are paths of head ranks (node ``(i, j)`` = head 0's
    rank-i token followed by head 1's rank-j token), sorted by depth then value. Node 0 is the
    root (the base's own next token); node ``n >= 1`` is ``choices[n - 1]``. Hashable: a static
    argument of the jitted decoder."""

    choices: tuple[tuple[int, ...], ...]

    @staticmethod
    def from_choices(choices, key: str = "tree") -> "Tree":
        paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
        if not paths:
            raise ConfigError(f"{key}: expected at least one path of head ranks, e.g. [[0], [0, 0], [1]]")
        have = set(paths)
        for p in paths:
            if not p or any(r < 0 for r in p):
                raise ConfigError(f"{key}: {list(p)} is not a path of ranks >= 0")
            if len(p) > 1 and p[:-1] not in have:
                raise ConfigError(f"{key}: path {list(p)} needs its parent {list(p[:-1])} in the tree")
        return Tree(tuple(paths))

    @staticmethod
    def cartesian(top_k) -> "Tree":
        """Every combination of the first ``top_k[0]`` tokens of head 0, ``top_k[1]`` of head 1, ...
        (``top_k[0] + top_k[0] top_k[1] + ...`` nodes besides the root)."""
        paths = [p for d in range(1, len(top_k) + 1) for p in itertools.product(*(range(k) for k in top_k[:d]))]
        return Tree.from_choices(paths)

    @property
    def n_nodes(self) -> int:
        return len(self.choices) + 1

    @property
    def max_depth(self) -> int:
        return max(len(c) for c in self.choices)

    @property
    def top_k(self) -> int:
        """Candidates needed per head (the largest rank + 1)."""
        return max(max(c) for c in self.choices) + 1

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """``depth [N]``, ``parent [N]`` (root: 0), ``cand [N]`` (index into ``[root, head 0's top-k,
        head 1's top-k, ...]``), ``mask [N, N]`` (ancestor-or-self: what each node attends to among
        the tree) and ``path [N, max_depth + 1]`` (each node's ancestor at every depth, root first;
        padded with the node itself)."""
        index = {c: i + 1 for i, c in enumerate(self.choices)}
        n, dmax, k = self.n_nodes, self.max_depth, self.top_k
        depth, parent, cand = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        mask = np.eye(n, dtype=bool)
        mask[:, 0] = True
        path = np.zeros((n, dmax + 1), np.int32)
        for c, i in index.items():
            depth[i] = len(c)
            parent[i] = index.get(c[:-1], 0)
            cand[i] = 1 + (len(c) - 1) * k + c[-1]
            ancestors = [0] + [index[c[:j]] for j in range(1, len(c) + 1)]
            mask[i, ancestors] = True
            path[i] = ancestors + [i] * (dmax + 1 - len(ancestors))
        return {"depth": depth, "parent": parent, "cand": cand, "mask": mask, "path": path}


# ------------------------------------------------------------------------------------------------
# the heads


def lm_head_weights(model_cfg, base_params) -> tuple[jax.Array, jax.Array | None]:
    """The model's output projection ``[d_model, vocab]`` (and its bias, or None)."""
    if model_cfg.tie_embeddings:
        return base_params["embed"]["embedding"].T, None
    head = base_params["lm_head"]
    return head["kernel"], head.get("bias")


def init_heads(model_cfg, base_params, n_heads: int, n_layers: int = 1) -> dict[str, jax.Array]:
    """Fresh heads: residual blocks zero-initialised (identity), projections = copies of the LM head."""
    d = model_cfg.d_model
    proj, bias = lm_head_weights(model_cfg, base_params)
    heads = {
        "w": jnp.zeros((n_heads, n_layers, d, d), proj.dtype),
        "b": jnp.zeros((n_heads, n_layers, d), proj.dtype),
        "proj": jnp.broadcast_to(proj, (n_heads, *proj.shape)).astype(proj.dtype),
    }
    if bias is not None:
        heads["proj_bias"] = jnp.broadcast_to(bias, (n_heads, bias.shape[0])).astype(bias.dtype)
    return heads


def heads_axes(heads) -> dict:
    """Logical axis names of the stacked heads (the head and block axes unsharded)."""
    from jax.sharding import PartitionSpec as P

    axes = {"w": P(None, None, "embed", None), "b": P(None, None, None), "proj": P(None, "embed", "vocab")}
    if "proj_bias" in heads:
        axes["proj_bias"] = P(None, "vocab")
    return axes


def head_hidden(heads, h: jax.Array) -> jax.Array:
    """The residual blocks: ``h [..., d]`` -> ``[K, ..., d]`` (each head's input to its projection)."""
    n_heads, n_layers = heads["w"].shape[:2]
    x = jnp.broadcast_to(h.astype(jnp.float32), (n_heads, *h.shape))
    for layer in range(n_layers):
        w, b = heads["w"][:, layer], heads["b"][:, layer]  # [K, d, d], [K, d]
        y = jnp.einsum("k...d,kde->k...e", x, w.astype(jnp.float32)) + b.astype(jnp.float32).reshape((n_heads,) + (1,) * (x.ndim - 2) + (b.shape[-1],))
        x = x + jax.nn.silu(y)
    return x


def head_logits(heads, h: jax.Array) -> jax.Array:
    """Every head's logits ``[K, ..., vocab]`` (float32) from the last hidden state ``h [..., d]``
    (after the final norm)."""
    x = head_hidden(heads, h)
    logits = jnp.einsum("k...d,kdv->k...v", x, heads["proj"].astype(jnp.float32))
    if "proj_bias" in heads:
        bias = heads["proj_bias"].astype(jnp.float32)
        logits = logits + bias.reshape((bias.shape[0],) + (1,) * (logits.ndim - 2) + (bias.shape[-1],))
    return logits


def final_hidden(model, base_params, hidden_states) -> jax.Array:
    """The last block's output after the final norm (what the LM head reads), from
    ``TransformerOutput.hidden_states``."""
    from jaxeff.models.transformer import _DTYPES, RMSNorm

    cfg = model.config
    norm = RMSNorm(cfg.norm_eps, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype])
    return norm.apply({"params": base_params["final_norm"]}, hidden_states[-1])


def heads_loss(heads, h, targets, valid, segment_ids, decay: float):
    """``sum_k decay^k CE_k`` and per-head metrics. ``h [b, t, d]`` (after the final norm), ``targets
    [b, t]``, ``valid [b, t]`` and ``segment_ids [b, t]`` the LM's next-token targets, loss mask and
    documents: head k at position i predicts ``targets[i + k + 1]``, counted where both targets are
    valid and positions i and i + k + 1 are in the same document."""
    n_heads = heads["w"].shape[0]
    logits = head_logits(heads, h)  # [K, b, t, V]
    t = h.shape[1]
    total, metrics = 0.0, {}
    for k in range(n_heads):
        s = k + 1  # extra shift beyond the LM's own
        if s >= t:
            break
        lg = logits[k, :, : t - s]
        tgt = targets[:, s:]
        m = valid[:, : t - s] * valid[:, s:] * (segment_ids[:, : t - s] == segment_ids[:, s:])
        logp = jax.nn.log_softmax(lg, axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        n = jnp.maximum(m.sum(), 1.0)
        ce = (nll * m).sum() / n
        top1 = ((jnp.argmax(lg, -1) == tgt) * m).sum() / n
        total = total + decay**k * ce
        metrics[f"medusa/ce_{k}"] = ce
        metrics[f"medusa/top1_{k}"] = top1
    return total, metrics


# ------------------------------------------------------------------------------------------------
# the method


@register_method("medusa", config=MedusaConfig)
def medusa_method(ctx: MethodContext) -> Method:
    """Medusa heads on the model from ``train.init_from``: heads only (``medusa1``) or heads and
    backbone (``medusa2``)."""
    cfg, model = ctx.cfg, ctx.model
    c = cfg.medusa
    c.make_tree()  # a bad tree is refused before training
    joint = c.mode == "medusa2"

    def prepare_params(base, rng):
        return {"model": base, "medusa": init_heads(model.config, base, c.n_heads, c.n_layers)}

    def loss(params, batch, rng, *, frozen, deterministic):
        base = params["model"] if joint else jax.lax.stop_gradient(params["model"])
        out = lm_forward(model, base, batch, rng, deterministic, return_hidden=True)
        lm, _ = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        h = final_hidden(model, base, out.hidden_states)
        hl, metrics = heads_loss(params["medusa"], h, batch["targets"], batch["loss_mask"].astype(jnp.float32), batch["segment_ids"], c.decay)
        value = c.lm_weight * lm + c.heads_weight * hl if joint else hl
        return value, {"ce": lm, "medusa/heads_loss": hl, **metrics}

    def trainable(params):
        return {"model": jax.tree.map(lambda _: joint, params["model"]), "medusa": jax.tree.map(lambda _: True, params["medusa"])}

    def optimizer(optim_cfg, total_steps, trainable_tree):
        """The run's optimizer for the backbone, the same at ``heads_lr_multiplier`` x the rate for
        the heads (each group clipped on its own); frozen leaves get no state."""
        from jaxeff.train.optim import make_optimizer

        heads_cfg = optim_cfg.model_copy(update={"lr": optim_cfg.lr * c.heads_lr_multiplier})
        labels = {
            "model": jax.tree.map(lambda t: "base" if t else "frozen", trainable_tree["model"]),
            "medusa": jax.tree.map(lambda _: "heads", trainable_tree["medusa"]),
        }
        return optax.multi_transform(
            {"heads": make_optimizer(heads_cfg, total_steps), "base": make_optimizer(optim_cfg, total_steps), "frozen": optax.set_to_zero()}, labels
        )

    heads_like = jax.eval_shape(lambda base: init_heads(model.config, base, c.n_heads, c.n_layers), ctx.abstract_params)
    return Method(
        "medusa",
        loss,
        trainable=trainable,
        prepare_params=prepare_params,
        logical_axes=lambda axes: {"model": axes, "medusa": heads_axes(heads_like)},
        model_params=lambda params: params["model"],
        optimizer=optimizer if c.heads_lr_multiplier != 1.0 else None,
    )


# ------------------------------------------------------------------------------------------------
# decoding


def _probs(logits, temperature, top_k):
    from jaxeff.decode.speculative import probs

    return probs(logits, temperature=temperature, top_k=top_k)


def accept_tree(
    tokens,
    logits,
    tree: Tree,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    posterior_threshold: float = POSTERIOR_THRESHOLD,
    posterior_alpha: float = POSTERIOR_ALPHA,
):
    """The accepted node of one verification: ``tokens [N]`` the tree's tokens, ``logits [N, vocab]``
    the base's logits at each node. Returns ``(node, depth)``: the deepest node whose path from the
    root is accepted (greedy: each token is the argmax at its parent; sampling: typical acceptance)."""
    a = tree.arrays
    parent, depth, mask = jnp.asarray(a["parent"]), jnp.asarray(a["depth"]), jnp.asarray(a["mask"])
    if temperature == 0.0:
        best = jnp.argmax(logits, axis=-1).astype(tokens.dtype)
        ok = tokens == best[parent]
        loglik = jnp.zeros(tokens.shape, jnp.float32)
    else:
        p = _probs(logits, temperature, top_k)  # [N, V]
        entropy = -jnp.sum(p * jnp.log(p + 1e-5), axis=-1)
        threshold = jnp.minimum(posterior_threshold, posterior_alpha * jnp.exp(-entropy))
        p_tok = p[parent, tokens]
        ok = p_tok > threshold[parent]
        loglik = jnp.log(jnp.maximum(p_tok, 1e-30))
    ok = ok.at[0].set(True)
    loglik = loglik.at[0].set(0.0)
    accepted = jnp.all(ok[None, :] | ~mask, axis=1)  # every ancestor (and itself) accepted
    path_loglik = jnp.where(mask, loglik[None, :], 0.0).sum(axis=1)
    score = jnp.where(accepted, depth * 1e4 + jnp.maximum(path_loglik, -1e3), -1e9)
    node = jnp.argmax(score).astype(jnp.int32)
    return node, depth[node]


def _compact(cache, index, path):
    """Move the cache entries of the accepted path's nodes (slots ``index + path``) to the slots
    ``index .. index + len(path) - 1`` (nodes are numbered parents first, so no entry is overwritten
    before it is read)."""

    def move(arr):  # [1, max_len, kv_heads, head_dim]
        return jax.lax.dynamic_update_slice_in_dim(arr, jnp.take(arr, index + path, axis=1), index, axis=1)

    return {"index": cache["index"], "layers": tuple({k: move(v) for k, v in layer.items()} for layer in cache["layers"])}


@functools.partial(jax.jit, static_argnames=("model", "tree", "max_new_tokens", "temperature", "top_k", "posterior_threshold", "posterior_alpha"))
def medusa_generate(
    model,
    base_params,
    heads,
    prompt: jax.Array,
    rng,
    *,
    tree: Tree,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    posterior_threshold: float = POSTERIOR_THRESHOLD,
    posterior_alpha: float = POSTERIOR_ALPHA,
):
    """``prompt [1, prompt_len]`` -> ``(tokens [1, max_new_tokens], stats)`` decoded with Medusa heads.

    ``stats``: ``calls`` (verification passes; the prefill not counted), ``generated`` (tokens produced,
    >= max_new_tokens; the extra ones are cut), ``accepted`` (candidate tokens kept beyond each pass's
    root), ``acceptance_length`` (generated / calls: tokens per model pass). Greedy
    (``temperature == 0``) output equals :func:`jaxeff.models.generate.generate`'s greedy output.
    """
    from jaxeff.models.transformer import init_cache

    if prompt.shape[0] != 1:
        raise ConfigError(f"prompt: Medusa decoding takes one sequence (batch 1), got batch {prompt.shape[0]}")
    n_heads = heads["w"].shape[0]
    if tree.max_depth > n_heads:
        raise ConfigError(f"tree: {tree.max_depth} deep but the run has {n_heads} Medusa heads (one per depth)")
    cfg = model.config
    if tree.top_k > cfg.vocab_size:
        raise ConfigError(f"tree: asks for rank {tree.top_k - 1} of a head but the vocabulary has {cfg.vocab_size} tokens")
    greedy = temperature == 0.0
    a = tree.arrays
    n_nodes, dmax, k = tree.n_nodes, tree.max_depth, tree.top_k
    depth, cand, mask, paths = (jnp.asarray(a[x]) for x in ("depth", "cand", "mask", "path"))
    t_len = prompt.shape[1]
    cache = init_cache(cfg, 1, t_len + max_new_tokens + n_nodes)
    out = model.apply({"params": base_params}, prompt, cache=cache, return_hidden=True)
    h = final_hidden(model, base_params, out.hidden_states)[0, -1]

    def iteration(state):
        buf, n, logits0, mlogits, cache, rng, calls, accepted = state
        rng, k_root = jax.random.split(rng)
        if greedy:
            root = jnp.argmax(logits0).astype(jnp.int32)
        else:
            root = jax.random.categorical(k_root, jnp.log(_probs(logits0, temperature, top_k))).astype(jnp.int32)
        top = jax.lax.top_k(mlogits[:dmax], k)[1].astype(jnp.int32)  # [depth, k]
        tokens = jnp.concatenate([root[None], top.reshape(-1)])[cand]  # [N]
        index = cache["index"]
        o = model.apply({"params": base_params}, tokens[None], positions=(index + depth)[None], cache=cache, tree_mask=mask, return_hidden=True)
        logits = o.logits[0]  # [N, V]
        node, n_acc = accept_tree(
            tokens, logits, tree, temperature=temperature, top_k=top_k, posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha
        )
        path = paths[node]  # [dmax + 1]
        new = jnp.where(jnp.arange(dmax + 1) <= n_acc, tokens[path], 0)
        buf = jax.lax.dynamic_update_slice(buf, new, (n,))
        cache = _compact(o.cache, index, path)
        cache = {"index": index + n_acc + 1, "layers": cache["layers"]}
        hn = final_hidden(model, base_params, o.hidden_states)[0, node]
        return buf, n + n_acc + 1, logits[node], head_logits(heads, hn), cache, rng, calls + 1, accepted + n_acc

    zero = jnp.zeros((), jnp.int32)
    state = (jnp.zeros((max_new_tokens + dmax + 1,), jnp.int32), zero, out.logits[0, -1], head_logits(heads, h), out.cache, rng, zero, zero)
    buf, n, _, _, _, _, calls, accepted = jax.lax.while_loop(lambda s: s[1] < max_new_tokens, iteration, state)
    stats = {"calls": calls, "generated": n, "accepted": accepted, "acceptance_length": n.astype(jnp.float32) / jnp.maximum(calls, 1).astype(jnp.float32)}
    return buf[None, :max_new_tokens], stats


def acceptance_length(stats) -> float:
    """Tokens per model pass of a Medusa decode (the paper's acceleration rate before overheads)."""
    return float(stats["generated"]) / max(int(stats["calls"]), 1)


__all__ = [
    "MedusaConfig",
    "Tree",
    "init_heads",
    "head_logits",
    "heads_loss",
    "final_hidden",
    "accept_tree",
    "medusa_generate",
    "acceptance_length",
    "medusa_method",
]
