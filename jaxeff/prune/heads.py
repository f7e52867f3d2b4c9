"""Attention-head importance and pruning (Michel et al., 2019, "Are Sixteen Heads Really Better than One?").

Every query head ``h`` of layer ``l`` gets a gate ``ξ[l, h]`` multiplying its context before the
output projection ``o`` (the model's ``masks={"head": ξ}``, ``[n_layers, n_heads]``). Its importance
is the expected absolute sensitivity of the loss to that gate at ``ξ = 1``:

    I[l, h] = E_x | ∂L(x) / ∂ξ[l, h] |

with ``x`` one sequence (a row of a packed batch) and ``L(x)`` its mean next-token loss: one backward
pass per batch, per-sequence gradients by ``vmap`` (the paper's expectation over examples; the
reference script takes ``|·|`` of the batch-mean gradient instead, which equals this at batch size 1).
Scores are then normalised per layer by their l2 norm (the paper's choice) so layers compare.

Iterative pruning (:func:`iterative_prune`): in steps of ``step_fraction`` of all heads, the
importance is recomputed with the heads pruned so far gated off, the least important remaining
heads are gated off, and the loss is measured after each step; ``order="random"`` takes the heads
in a seeded random order instead (the paper's baseline).

GQA: the unit is the query head (the paper's unit). A kv head stays as long as at least one query
head of its group does. :func:`fold_heads` then builds a smaller dense model with one shape for every
layer, as :class:`~jaxeff.models.TransformerConfig` needs: ``n_kv_heads`` = the most kv groups any
layer keeps, queries per group = the most query heads any kept group keeps. Layers or groups that
keep fewer are padded with zero heads (zero ``q``/``k``/``v`` columns and zero rows of ``o``: they
add exactly 0), so the small model's logits equal the gated model's. ``fold_heads`` reports how many
padding heads it needed. Global pruning (the paper's, the default) usually leaves layers uneven, so
the padded model may be no smaller; ``balance="group"`` takes the same number of query heads out of
every kv group of every layer (every layer without GQA), which extracts to a smaller model with no
padding (``n_kv_heads`` unchanged, fewer query heads per group).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import CheckpointError, ConfigError, JaxeffError

ORDERS = ("importance", "random")
BALANCES = ("global", "group")


# ------------------------------------------------------------------------------------------------
# arguments


def check_fraction(fraction, field: str = "--fraction") -> float:
    """The share of heads to prune: a number in [0, 1), as Wanda's sparsity."""
    from jaxeff.prune.wanda import check_sparsity

    return check_sparsity(fraction, field)


def _check_positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}: expected a positive integer (got {value!r})")
    return value


# ------------------------------------------------------------------------------------------------
# losses and importance (pure functions of model, params, gates, batch)


def _fields(batch):
    """``(inputs, targets, positions, segment_ids, loss_mask)`` of a packed batch as jnp arrays."""
    return tuple(jnp.asarray(batch[k]) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask"))


def _sequence_loss(model, params, gates, inputs, targets, positions, segment_ids, loss_mask):
    """Mean next-token loss of one sequence (``[seq]`` arrays) with head gates ``[layers, heads]``,
    and its number of real tokens."""
    out = model.apply({"params": params}, inputs[None], positions=positions[None], segment_ids=segment_ids[None], masks={"head": gates})
    logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    m = loss_mask.astype(jnp.float32)
    n = m.sum()
    return (nll * m).sum() / jnp.maximum(n, 1.0), n


def gate_gradients(model, params, gates, batch):
    """``(∂L(x)/∂ξ [batch, layers, heads], tokens [batch])``: the gradient of each sequence's mean
    loss with respect to the head gates, evaluated at ``gates``."""
    grad = jax.grad(lambda g, *xs: _sequence_loss(model, params, g, *xs)[0])
    per_seq = jax.vmap(grad, in_axes=(None, 0, 0, 0, 0, 0))(gates, *_fields(batch))
    n = jnp.asarray(batch["loss_mask"]).astype(jnp.float32).sum(-1)
    return per_seq, n


def batch_loss(model, params, gates, batch):
    """``(sum of token losses, number of tokens)`` of a packed batch with head gates."""
    inputs, targets, positions, segment_ids, loss_mask = _fields(batch)
    out = model.apply({"params": params}, inputs, positions=positions, segment_ids=segment_ids, masks={"head": gates})
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask.astype(jnp.float32)
    return (nll * m).sum(), m.sum()


class HeadScorer:
    """Jitted importance and loss of one model over fixed batches (compiled once per batch shape)."""

    def __init__(self, model, params):
        self.model, self.params = model, params
        self._grads = jax.jit(lambda p, g, b: gate_gradients(model, p, g, b))
        self._loss = jax.jit(lambda p, g, b: batch_loss(model, p, g, b))

    def importance(self, gates, batches: Iterable, *, normalize: bool = True) -> np.ndarray:
        """``I [layers, heads]`` = mean over sequences (with real tokens) of ``|∂L(x)/∂ξ|``, each
        layer divided by its l2 norm when ``normalize``."""
        total, count = 0.0, 0
        for batch in batches:
            g, n = self._grads(self.params, jnp.asarray(gates, jnp.float32), batch)
            real = np.asarray(n) > 0
            total = total + np.abs(np.asarray(g, np.float64))[real].sum(0)
            count += int(real.sum())
        if count == 0:
            raise ConfigError("--batches: the importance batches hold no real tokens")
        imp = total / count
        if normalize:
            imp = imp / np.maximum(np.linalg.norm(imp, axis=-1, keepdims=True), 1e-20)
        return imp

    def loss(self, gates, batches: Iterable) -> float:
        """Mean loss over the real tokens of ``batches`` with head gates."""
        tot, n = 0.0, 0.0
        for batch in batches:
            s, c = self._loss(self.params, jnp.asarray(gates, jnp.float32), batch)
            tot, n = tot + float(s), n + float(c)
        return tot / max(n, 1.0)


def _cells(L: int, H: int, kv_heads: int | None) -> list[np.ndarray]:
    """Flat head indices of each unit of ``balance="group"``: every (layer, kv group) with GQA, every
    layer with multi-head attention (one query head per kv head)."""
    G = H if kv_heads is None else kv_heads
    g = H // G
    if g == 1:
        return [l * H + np.arange(H) for l in range(L)]
    return [l * H + grp * g + np.arange(g) for l in range(L) for grp in range(G)]


def iterative_prune(
    scorer: HeadScorer,
    shape: tuple[int, int],
    imp_batches,
    eval_batches,
    *,
    fraction: float,
    step_fraction: float = 0.1,
    order: str = "importance",
    seed: int = 0,
    normalize: bool = True,
    balance: str = "global",
    kv_heads: int | None = None,
):
    """Gate off a ``fraction`` of the heads, iteratively; the loss after every step.

    ``balance="global"`` (the paper): ``round(fraction · heads)`` heads in steps of
    ``max(1, round(step_fraction · heads))``, anywhere in the model. ``balance="group"``: every step
    takes one head out of every kv group of every layer (every layer without GQA; ``kv_heads`` =
    the model's), ``min(round(fraction · group size), group size - 1)`` steps, so every group keeps
    the same number and :func:`fold_heads` needs no padding (``step_fraction`` unused).

    ``order="importance"``: before each step the importance is recomputed with the current gates
    and the lowest-scoring remaining heads go (ties: lower flat index first; within a group the
    per-layer normalisation does not change the ranking); ``"random"``: a seeded random order;
    ``normalize=False`` ranks the raw scores (no per-layer l2). Returns ``(gates [layers, heads] of
    0/1, history)``; ``history`` is a list of ``{"pruned", "fraction", "loss"}``, the first entry the
    unpruned model."""
    fraction = check_fraction(fraction, "fraction")
    if order not in ORDERS:
        raise ConfigError(f"--order: expected importance or random (got {order!r})")
    if balance not in BALANCES:
        raise ConfigError(f"--balance: expected global or group (got {balance!r})")
    if not 0.0 < step_fraction <= 1.0:
        raise ConfigError(f"step_fraction: expected a number in (0, 1] (got {step_fraction})")
    imp_batches, eval_batches = list(imp_batches), list(eval_batches)
    L, H = shape
    total = L * H
    gates = np.ones((L, H), np.float32)
    flat = gates.reshape(-1)
    rng = np.random.default_rng(seed)
    history = [{"pruned": 0, "fraction": 0.0, "loss": scorer.loss(gates, eval_batches)}]

    def scores():
        return np.where(flat == 0, np.inf, scorer.importance(gates, imp_batches, normalize=normalize).reshape(-1))

    if balance == "global":
        target = int(round(fraction * total))
        per_step = max(1, int(round(step_fraction * total)))
        perm = rng.permutation(total)
        pruned = 0
        while pruned < target:
            n = min(per_step, target - pruned)
            pick = np.argsort(scores(), kind="stable")[:n] if order == "importance" else perm[pruned : pruned + n]
            flat[pick] = 0.0
            pruned += n
            history.append({"pruned": pruned, "fraction": pruned / total, "loss": scorer.loss(gates, eval_batches)})
        return gates, history
    cells = _cells(L, H, kv_heads)
    size = len(cells[0])
    steps = min(int(round(fraction * size)), size - 1)
    perms = [rng.permutation(c) for c in cells]
    for k in range(steps):
        if order == "importance":
            imp = scores()
            pick = [c[np.argsort(imp[c], kind="stable")[0]] for c in cells]
        else:
            pick = [p[k] for p in perms]
        flat[pick] = 0.0
        pruned = (k + 1) * len(cells)
        history.append({"pruned": pruned, "fraction": pruned / total, "loss": scorer.loss(gates, eval_batches)})
    return gates, history


def ablation_increase(scorer: HeadScorer, shape: tuple[int, int], eval_batches) -> np.ndarray:
    """``[layers, heads]``: the eval loss increase when that head alone is gated off (the quantity
    the importance score estimates to first order)."""
    eval_batches = list(eval_batches)
    ones = np.ones(shape, np.float32)
    base = scorer.loss(ones, eval_batches)
    out = np.zeros(shape)
    for l in range(shape[0]):
        for h in range(shape[1]):
            g = ones.copy()
            g[l, h] = 0.0
            out[l, h] = scorer.loss(g, eval_batches) - base
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two arrays (ties ranked by position)."""
    ra = np.argsort(np.argsort(np.ravel(a), kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(np.ravel(b), kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------------------------------
# extraction


def fold_heads(model_params, model_cfg, gates):
    """``(small_params, small_cfg, info)``: a dense model that computes what ``model_params`` does
    with head gates ``gates [layers, heads]`` of 0/1 (0 = pruned). Only the attention projections
    change; see the module docstring for GQA and padding. ``info``: kept heads per layer, the new
    head counts and the number of padding heads."""
    m = model_cfg
    L, H, G, hd = m.n_layers, m.n_heads, m.kv_heads, m.hd
    g = H // G
    z = np.asarray(jax.device_get(gates), np.float32)
    if z.shape != (L, H):
        raise JaxeffError(f"gates: shape {z.shape}, expected {(L, H)} (layers, heads) for this model")
    if not np.all((z == 0) | (z == 1)):
        raise JaxeffError("gates: expected values 0 (pruned) or 1 (kept)")
    if not z.any():
        raise JaxeffError("gates: every head is pruned; nothing to extract")
    zg = z.reshape(L, G, g)
    kept_groups = [np.flatnonzero(zg[l].any(-1)) for l in range(L)]
    G2 = max(len(k) for k in kept_groups)
    g2 = max(int(zg[l, k].sum()) for l in range(L) for k in kept_groups[l])
    P = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), model_params)
    new = {k: v for k, v in P.items() if not k.startswith("layers_")}
    padding = 0
    for l in range(L):
        src = P[f"layers_{l}"]
        a = src["attn"]
        # for every slot of the small layer: the source head (or -1 = padding)
        q_src = np.full((G2, g2), -1)
        kv_src = np.full(G2, -1)
        for j, grp in enumerate(kept_groups[l]):
            kv_src[j] = grp
            heads = grp * g + np.flatnonzero(zg[l, grp])
            q_src[j, : len(heads)] = heads
        padding += int((q_src < 0).sum())

        def cols(src_dense, index, width):
            k = src_dense["kernel"]
            out_k = np.zeros((k.shape[0], len(index) * width), k.dtype)
            out_b = None if "bias" not in src_dense else np.zeros(len(index) * width, src_dense["bias"].dtype)
            for s, i in enumerate(index):
                if i >= 0:
                    out_k[:, s * width : (s + 1) * width] = k[:, i * width : (i + 1) * width]
                    if out_b is not None:
                        out_b[s * width : (s + 1) * width] = src_dense["bias"][i * width : (i + 1) * width]
            return {"kernel": out_k} if out_b is None else {"kernel": out_k, "bias": out_b}

        qi = q_src.reshape(-1)
        o = a["o"]["kernel"]
        o_new = np.zeros((len(qi) * hd, o.shape[1]), o.dtype)
        for s, i in enumerate(qi):
            if i >= 0:
                o_new[s * hd : (s + 1) * hd] = o[i * hd : (i + 1) * hd]
        attn = {"q": cols(a["q"], qi, hd), "k": cols(a["k"], kv_src, hd), "v": cols(a["v"], kv_src, hd), "o": {**a["o"], "kernel": o_new}}
        new[f"layers_{l}"] = {**src, "attn": attn}
    small = dataclasses.replace(m, n_heads=G2 * g2, n_kv_heads=None if m.n_kv_heads is None and g2 == 1 else G2, head_dim=hd)
    info = {"kept_heads_per_layer": [int(v) for v in z.sum(-1)], "n_heads": G2 * g2, "n_kv_heads": G2, "padding_heads": padding}
    return new, small, info


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------------
# run folders (the CLI)


def run_batches(cfg, n_train: int):
    """``(importance batches, eval batches)`` of a run's data section: the first ``n_train`` training
    batches, and up to ``train.eval_batches`` eval batches of every eval domain."""
    from jaxeff.data.loader import eval_batches
    from jaxeff.train.inputs import build_data

    _, loader, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    train = [loader.next_batch() for _ in range(n_train)]
    evals = []
    for arrays in eval_sets.values():
        for i, b in enumerate(eval_batches(arrays, cfg.data.batch_size)):
            if i >= cfg.train.eval_batches:
                break
            evals.append(b)
    return train, evals


def prune_heads_run(
    run,
    out,
    *,
    fraction: float,
    order: str = "importance",
    batches: int = 4,
    step_fraction: float = 0.1,
    seed: int = 0,
    step: int | None = None,
    batch_size: int | None = None,
    normalize: bool = True,
    balance: str = "global",
):
    """Prune ``fraction`` of a run's attention heads (iteratively, :func:`iterative_prune`), fold the
    result into a smaller dense model (:func:`fold_heads`) and save it as run ``out`` (method
    ``lm``). Writes ``out/heads.json`` (settings, loss after each step, final importance, gates)
    and returns that record."""
    from pydantic import TypeAdapter

    from jaxeff.models import Transformer
    from jaxeff.models.config import TransformerConfig
    from jaxeff.runs import lm_run_config, load_model_params, read_config, save_model_run
    from jaxeff.train.checkpoint import find_checkpoint_dir

    fraction = check_fraction(fraction)
    if order not in ORDERS:
        raise ConfigError(f"--order: expected importance or random (got {order!r})")
    if balance not in BALANCES:
        raise ConfigError(f"--balance: expected global or group (got {balance!r})")
    _check_positive(batches, "--batches")
    if not 0.0 < float(step_fraction) <= 1.0:
        raise ConfigError(f"--step-fraction: expected a number in (0, 1] (got {step_fraction})")
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise CheckpointError(f"--out: '{out}' already holds a checkpoint; choose another folder")
    find_checkpoint_dir(run)  # a missing run: one line before any work
    saved = read_config(run, step)
    changes = {} if batch_size is None else {"data.batch_size": batch_size}
    cfg, params = load_model_params(run, step)
    data_cfg = lm_run_config(saved, out, **changes)
    model = Transformer(cfg.model)
    imp_batches, evals = run_batches(data_cfg, batches)
    scorer = HeadScorer(model, params)
    shape = (cfg.model.n_layers, cfg.model.n_heads)
    importance0 = scorer.importance(np.ones(shape, np.float32), imp_batches, normalize=normalize)
    gates, history = iterative_prune(
        scorer,
        shape,
        imp_batches,
        evals,
        fraction=fraction,
        step_fraction=float(step_fraction),
        order=order,
        seed=seed,
        normalize=normalize,
        balance=balance,
        kv_heads=cfg.model.n_kv_heads,
    )
    small_params, small_cfg, info = fold_heads(params, cfg.model, gates)
    small_model = Transformer(small_cfg)
    small_loss = HeadScorer(small_model, small_params).loss(np.ones((small_cfg.n_layers, small_cfg.n_heads), np.float32), evals)
    model_dict = TypeAdapter(TransformerConfig).dump_python(small_cfg, mode="json")
    out_cfg = lm_run_config(saved, out, model=model_dict)
    save_model_run(jax.device_put(small_params, jax.devices()[0]), out_cfg)
    record = {
        "source": str(Path(run).absolute()),
        "fraction": fraction,
        "order": order,
        "batches": batches,
        "step_fraction": float(step_fraction),
        "seed": seed,
        "normalize": normalize,
        "balance": balance,
        "history": history,
        "importance_unpruned": importance0.tolist(),
        "gates": gates.tolist(),
        **info,
        "params_before": count_params(params),
        "params_after": count_params(small_params),
        "extracted_loss": small_loss,
    }
    (out / "heads.json").write_text(json.dumps(record, indent=1))
    return record


__all__ = [
    "ORDERS",
    "BALANCES",
    "check_fraction",
    "gate_gradients",
    "batch_loss",
    "HeadScorer",
    "iterative_prune",
    "ablation_increase",
    "spearman",
    "fold_heads",
    "count_params",
    "run_batches",
    "prune_heads_run",
]
