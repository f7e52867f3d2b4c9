"""Hard-concrete L0 masks (Louizos et al., 2018) as used by Sheared-LLaMA, and the expected size
of a masked model.

Each mask entry has a parameter ``log α``. Training samples a value in [0, 1] that is exactly 0 or
1 with positive probability::

    u ~ U(ε, 1−ε);  s = σ((ln u − ln(1−u) + log α) / β);  z = clip(s·(r − l) + l, 0, 1)

with β = 2/3, l = −0.1, r = 1.1, ε = 1e-6. The probability that an entry is non-zero (its *keep
probability*) is ``1 − σ(β·ln(−l/r) − log α)`` (clamped to [ε, 1−ε]). At the end the masks are made
deterministic: per row the ``k`` entries with the largest log α are kept with value
``σ(log α / β · 0.8)`` (the reference code's soft value), the others are 0.

Mask types and shapes (the trained tree ``log_alpha`` holds the types being pruned)::

    head          [n_layers, n_kv_heads]   one entry per kv group (= per head for MHA)
    intermediate  [n_layers, d_ff]
    layer         [n_layers]               multiplies both the attention and the MLP output
    hidden        [d_model]

:func:`model_masks` turns them into the ``masks`` argument of :class:`jaxeff.models.Transformer`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BETA = 2.0 / 3.0
LEFT = -0.1
RIGHT = 1.1
EPS = 1e-6
LOG_ALPHA_MIN = math.log(0.01)
LOG_ALPHA_MAX = math.log(100.0)
SOFT_FACTOR = 0.8  # deterministic masks: σ(log α / β · 0.8), as the reference code


def mask_shapes(model_cfg, types) -> dict[str, tuple[int, ...]]:
    """Shapes of the log α of each mask type in ``types``."""
    shapes = {
        "head": (model_cfg.n_layers, model_cfg.kv_heads),
        "intermediate": (model_cfg.n_layers, model_cfg.ff),
        "layer": (model_cfg.n_layers,),
        "hidden": (model_cfg.d_model,),
    }
    return {t: shapes[t] for t in types}


def init_log_alpha(rng, shapes: dict[str, tuple[int, ...]], mean: float, std: float) -> dict[str, jax.Array]:
    """log α ~ N(mean, std²) per entry, float32."""
    return {t: mean + std * jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32) for i, (t, shape) in enumerate(sorted(shapes.items()))}


def sample(log_alpha: jax.Array, rng) -> jax.Array:
    """One training sample of the mask, in [0, 1], differentiable in log α."""
    u = jax.random.uniform(rng, log_alpha.shape, jnp.float32, EPS, 1.0 - EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


def keep_prob(log_alpha: jax.Array) -> jax.Array:
    """P(z ≠ 0) of each entry: ``1 − clamp(σ(β·ln(−l/r) − log α), ε, 1−ε)``."""
    return 1.0 - jnp.clip(jax.nn.sigmoid(BETA * math.log(-LEFT / RIGHT) - log_alpha), EPS, 1.0 - EPS)


def soft_value(log_alpha: jax.Array) -> jax.Array:
    """The value a kept entry has in the deterministic mask: σ(log α / β · 0.8)."""
    return jax.nn.sigmoid(log_alpha / BETA * SOFT_FACTOR)


def keep_top(scores: jax.Array, k: int) -> jax.Array:
    """0/1 float mask keeping the ``k`` largest entries of each row (last axis) of ``scores``
    (ties: the lower index)."""
    n = scores.shape[-1]
    if k >= n:
        return jnp.ones_like(scores, jnp.float32)
    if k <= 0:
        return jnp.zeros_like(scores, jnp.float32)
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.float32), axis=-2)


def deterministic(log_alpha: jax.Array, keep: int) -> jax.Array:
    """The final mask: per row the ``keep`` entries of largest log α, at :func:`soft_value`; 0 elsewhere."""
    return keep_top(log_alpha, keep) * soft_value(log_alpha)


def sample_masks(log_alpha: dict[str, jax.Array], rng) -> dict[str, jax.Array]:
    return {t: sample(v, jax.random.fold_in(rng, i)) for i, (t, v) in enumerate(sorted(log_alpha.items()))}


def deterministic_masks(log_alpha: dict[str, jax.Array], targets: dict[str, int]) -> dict[str, jax.Array]:
    """Deterministic masks keeping ``targets[type]`` entries per row of each type."""
    return {t: deterministic(v, targets[t]) for t, v in log_alpha.items()}


def model_masks(masks: dict[str, jax.Array], model_cfg) -> dict[str, jax.Array]:
    """Mask types -> the ``masks`` argument of :class:`jaxeff.models.Transformer` (the kv-group
    head mask repeated over the query heads of each group; the layer mask on attention and MLP)."""
    out = {}
    if "head" in masks:
        out["head"] = jnp.repeat(masks["head"], model_cfg.n_heads // model_cfg.kv_heads, axis=1)
    if "layer" in masks:
        out["attn"] = out["mlp"] = masks["layer"]
    if "intermediate" in masks:
        out["intermediate"] = masks["intermediate"]
    if "hidden" in masks:
        out["hidden"] = masks["hidden"]
    return out


def expected_params(probs: dict[str, jax.Array], model_cfg) -> jax.Array:
    """Expected number of parameters of the pruned model (embeddings, norms and biases included),
    from per-entry keep probabilities (a missing type keeps everything).

    Entries are independent, so an expectation of a product is the product of expectations: a
    kv group's parameters count with its probability times its layer's, MLP units likewise, and
    every parameter that has a hidden-size dimension scales with the expected kept hidden size.
    With hard 0/1 masks this is the exact count of kept parameters; with masks of the target
    architecture it equals the target's ``TransformerConfig.param_count()``."""
    m = model_cfg
    L, G, g, hd, V = m.n_layers, m.kv_heads, m.n_heads // m.kv_heads, m.hd, m.vocab_size
    b, qb = float(m.use_bias), float(m.use_bias or m.qkv_bias)
    d = jnp.sum(probs["hidden"]) if "hidden" in probs else jnp.float32(m.d_model)
    groups = jnp.sum(probs["head"], axis=-1) if "head" in probs else jnp.full((L,), G, jnp.float32)
    units = jnp.sum(probs["intermediate"], axis=-1) if "intermediate" in probs else jnp.full((L,), m.ff, jnp.float32)
    layer = probs["layer"] if "layer" in probs else jnp.ones((L,), jnp.float32)
    attn = groups * (d * hd * (2 * g + 2) + qb * hd * (g + 2)) + b * d
    mlp = units * (3 * d + 2 * b) + b * d
    total = jnp.sum(layer * (attn + mlp + 2 * d)) + d + V * d
    if not m.tie_embeddings:
        total = total + d * V + b * V
    return total


__all__ = [
    "BETA",
    "LEFT",
    "RIGHT",
    "EPS",
    "LOG_ALPHA_MIN",
    "LOG_ALPHA_MAX",
    "mask_shapes",
    "init_log_alpha",
    "sample",
    "keep_prob",
    "soft_value",
    "keep_top",
    "deterministic",
    "sample_masks",
    "deterministic_masks",
    "model_masks",
    "expected_params",
]
