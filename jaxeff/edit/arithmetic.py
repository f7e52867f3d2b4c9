"""Task vectors over parameter trees: tau = theta_ft - theta_pre, and what can be done with them.

Every function here is pure (the heavier ones jitted) and works on any pytree of float arrays (a
model's ``params``); trees
that do not match (a missing or extra parameter, another shape) raise :class:`JaxeffError` naming
the first differing parameter path. Arithmetic is done in float32 and each result leaf keeps the
dtype of the first tree's leaf (a bf16 model stays bf16).

    tau_a = task_vector(ft_arith, base)                  # what fine-tuning on arithmetic changed
    multi = apply_vectors(base, [tau_a, tau_c], [0.5, 0.5])   # theta_pre + sum_i lambda_i tau_i
    forget = apply_vectors(base, [tau_a], [-1.0])        # negation
    tau_d = analogy(tau_a, tau_b, tau_c)                 # tau_C + (tau_B - tau_A)
    moved = transfer(new_base, old_base, old_ft)         # new_base + (old_ft - old_base)
    merged = apply_vectors(base, [ties_merge([tau_a, tau_c], k=0.2)], [1.0])
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import JaxeffError

Tree = Any


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _leaves(tree: Tree) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def first_difference(a: Tree, b: Tree) -> tuple[str, str] | None:
    """``(path, what)`` of the first parameter (in sorted path order) where the trees differ in
    presence, shape or dtype kind; ``None`` when they hold the same parameters."""
    la, lb = _leaves(a), _leaves(b)
    for path in sorted(set(la) | set(lb)):
        if path not in lb:
            return path, f"shape {tuple(np.shape(la[path]))} in the first, absent in the second"
        if path not in la:
            return path, f"absent in the first, shape {tuple(np.shape(lb[path]))} in the second"
        sa, sb = tuple(np.shape(la[path])), tuple(np.shape(lb[path]))
        if sa != sb:
            return path, f"shape {sa} in the first, {sb} in the second"
        for x in (la[path], lb[path]):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return path, f"dtype {x.dtype} is not a float (task vectors need float parameters)"
    return None


def check_compatible(a: Tree, b: Tree, what: str = "parameter trees") -> None:
    """Raise JaxeffError naming the first differing parameter path of two trees."""
    diff = first_difference(a, b)
    if diff is not None:
        raise JaxeffError(f"{what} differ at parameter '{diff[0]}': {diff[1]}")


def _combine(fn, first: Tree, *others: Tree) -> Tree:
    for i, o in enumerate(others):
        check_compatible(first, o, f"parameter trees 1 and {i + 2}")
    return jax.tree.map(lambda x, *ys: fn(x.astype(jnp.float32), *(y.astype(jnp.float32) for y in ys)).astype(x.dtype), first, *others)


@jax.jit
def task_vector(finetuned: Tree, pretrained: Tree) -> Tree:
    """tau = theta_ft - theta_pre (leaf by leaf)."""
    return _combine(lambda f, p: f - p, finetuned, pretrained)


def add(*trees: Tree) -> Tree:
    """Leaf-wise sum of one or more trees of the same structure."""
    if not trees:
        raise ValueError("add: expected at least one tree")
    return _combine(lambda *xs: sum(xs[1:], xs[0]), *trees)


def scale(tree: Tree, factor: float) -> Tree:
    """lambda * tau."""
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * factor).astype(x.dtype), tree)


def negate(tree: Tree) -> Tree:
    """-tau (forgetting: theta_pre - tau)."""
    return scale(tree, -1.0)


@jax.jit
def apply_vectors(base: Tree, vectors: Sequence[Tree], scales: Sequence[float] | None = None) -> Tree:
    """theta = theta_pre + sum_i lambda_i tau_i (``scales`` default to 1; negative = negation)."""
    scales = [1.0] * len(vectors) if scales is None else list(scales)
    if len(scales) != len(vectors):
        raise ValueError(f"apply_vectors: {len(vectors)} vectors but {len(scales)} scales")
    for i, v in enumerate(vectors):
        check_compatible(base, v, f"base and task vector {i + 1}")
    if not vectors:
        return base

    def combine(b, *vs):
        return (b.astype(jnp.float32) + sum(s * v.astype(jnp.float32) for s, v in zip(scales, vs))).astype(b.dtype)

    return jax.tree.map(combine, base, *vectors)


def analogy(tau_a: Tree, tau_b: Tree, tau_c: Tree) -> Tree:
    """ "A is to B as C is to D": tau_D = tau_C + (tau_B - tau_A)."""
    return _combine(lambda a, b, c: c + (b - a), tau_a, tau_b, tau_c)


def transfer(target_base: Tree, source_base: Tree, source_finetuned: Tree, factor: float = 1.0) -> Tree:
    """Fine-tuning transfer: m_t + factor * (m'_s - m_s), the change fine-tuning made to base
    version s added to base version t (same architecture)."""
    return apply_vectors(target_base, [task_vector(source_finetuned, source_base)], [factor])


# ------------------------------------------------------------------------------------------------
# TIES-merging (Yadav et al., 2023)


def _flat_f32(tree: Tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _keep_count(n: int, k: float) -> int:
    return max(1, min(n, int(round(k * n))))


@functools.partial(jax.jit, static_argnames=("k", "scope"))
def trim(tau: Tree, k: float, scope: str = "global") -> Tree:
    """Keep the top-``k`` fraction of entries by magnitude, zero the rest. ``scope="global"`` ranks
    every entry of the whole task vector together (the TIES reference), ``"tensor"`` ranks each
    parameter on its own. The threshold is the ``round(k * n)``-th largest magnitude (at least one
    entry); entries equal to it are all kept."""
    if not 0.0 < k <= 1.0:
        raise JaxeffError(f"ties.k: expected a fraction in (0, 1] (got {k})")
    if scope not in ("global", "tensor"):
        raise JaxeffError(f"ties.trim: expected 'global' or 'tensor' (got {scope!r})")

    def threshold(mags: jax.Array) -> jax.Array:
        n = mags.size
        return jnp.sort(jnp.ravel(mags))[n - _keep_count(n, k)]

    if scope == "global":
        t = threshold(jnp.abs(_flat_f32(tau)))
        return jax.tree.map(lambda x: jnp.where(jnp.abs(x.astype(jnp.float32)) >= t, x, jnp.zeros_like(x)), tau)
    return jax.tree.map(lambda x: jnp.where(jnp.abs(x.astype(jnp.float32)) >= threshold(jnp.abs(x.astype(jnp.float32))), x, jnp.zeros_like(x)), tau)


@jax.jit
def elect_sign(trimmed: Sequence[Tree]) -> Tree:
    """Per parameter, the sign (+1 / -1) of the sum of the trimmed task vectors. Where that sum is
    exactly 0 the sign of the whole vector's majority is used (the sign of the sum of all elected
    signs; +1 if that is 0 too), as the TIES reference does."""
    total = jax.tree.map(lambda *xs: sum(x.astype(jnp.float32) for x in xs), *trimmed)
    signs = jax.tree.map(jnp.sign, total)
    majority = jnp.sign(sum(jnp.sum(s) for s in jax.tree.leaves(signs)))
    majority = jnp.where(majority == 0, 1.0, majority)
    return jax.tree.map(lambda s: jnp.where(s == 0, majority, s), signs)


@jax.jit
def disjoint_mean(trimmed: Sequence[Tree], signs: Tree) -> Tree:
    """Per parameter, the mean of the trimmed values whose sign agrees with the elected sign (zeros
    and disagreeing values are left out; no agreeing value gives 0)."""

    def merge(s, *xs):
        xs = [x.astype(jnp.float32) for x in xs]
        agree = [jnp.where(s > 0, x > 0, x < 0) for x in xs]
        total = sum(jnp.where(a, x, 0.0) for a, x in zip(agree, xs))
        count = sum(a.astype(jnp.float32) for a in agree)
        return total / jnp.maximum(count, 1.0)

    out = jax.tree.map(merge, signs, *trimmed)
    return jax.tree.map(lambda o, x: o.astype(x.dtype), out, trimmed[0])


@functools.partial(jax.jit, static_argnames=("k", "scope"))
def ties_merge(vectors: Sequence[Tree], k: float = 0.2, scope: str = "global") -> Tree:
    """TIES: trim each task vector to its top-``k`` magnitudes, elect a sign per parameter, take
    the disjoint mean. Returns the merged task vector (add it with ``apply_vectors(base, [m], [lam])``)."""
    if not vectors:
        raise ValueError("ties_merge: expected at least one task vector")
    for i, v in enumerate(vectors[1:]):
        check_compatible(vectors[0], v, f"task vectors 1 and {i + 2}")
    trimmed = [trim(v, k, scope) for v in vectors]
    return disjoint_mean(trimmed, elect_sign(trimmed))


def sign_conflicts(vectors: Sequence[Tree]) -> float:
    """Share of entries where at least two non-zero task vector values have opposite signs."""
    flats = [np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(v)]) for v in vectors]
    pos, neg = sum(f > 0 for f in flats), sum(f < 0 for f in flats)
    return float(np.mean((pos > 0) & (neg > 0)))


__all__ = [
    "first_difference",
    "check_compatible",
    "task_vector",
    "add",
    "scale",
    "negate",
    "apply_vectors",
    "analogy",
    "transfer",
    "trim",
    "elect_sign",
    "disjoint_mean",
    "ties_merge",
    "sign_conflicts",
]
