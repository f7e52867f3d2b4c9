"""Distillation losses as pure functions, usable without the trainer.

Shapes: logits ``[batch, seq, vocab]``, hidden states ``[batch, seq, width]``, mask ``[batch, seq]``
(1 = a real token; ``None`` counts every token). Every loss is a mean over real tokens, in float32.

    kd_loss(student_logits, teacher_logits, mask, temperature=2.0)            # T² · KL(p_t ‖ p_s)
    kd_loss(..., divergence="reverse_kl")                                      # T² · KL(p_s ‖ p_t)
    kd_loss(..., divergence="jsd", beta=0.5)                                   # T² · JSD_β(p_t ‖ p_s)
    cosine_loss(h_student, h_teacher, mask)                                    # 1 − cos
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from jaxeff.train.losses import cross_entropy

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values [batch, seq]`` over the tokens where ``mask`` is 1 (0 when there are none)."""
    values = values.astype(jnp.float32)
    if mask is None:
        return values.mean()
    mask = mask.astype(jnp.float32)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _kl_from_logp(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Σ_v p (log p − log q) over the last axis, with 0·log 0 = 0."""
    p = jnp.exp(logp)
    return jnp.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-position KL(softmax(p/T) ‖ softmax(q/T)) in nats: ``[..., vocab] -> [...]``."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
    return _kl_from_logp(logp, logq)


def generalized_jsd(p_logits: jax.Array, q_logits: jax.Array, beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """Per-position generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024):
    β·KL(P ‖ M) + (1−β)·KL(Q ‖ M) with M = β·P + (1−β)·Q; β = 0.5 is the usual JSD (≤ ln 2)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta: expected 0 < beta < 1 (got {beta})")
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
    logm = jnp.logaddexp(jnp.log(beta) + logp, jnp.log1p(-beta) + logq)
    return beta * _kl_from_logp(logp, logm) + (1.0 - beta) * _kl_from_logp(logq, logm)


def token_divergence(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0, divergence: Divergence = "forward_kl", beta: float = 0.5
) -> jax.Array:
    """Per-position divergence between teacher and student soft targets (not yet × T²)."""
    if divergence == "forward_kl":
        return kl_divergence(teacher_logits, student_logits, temperature)
    if divergence == "reverse_kl":
        return kl_divergence(student_logits, teacher_logits, temperature)
    if divergence == "jsd":
        return generalized_jsd(teacher_logits, student_logits, beta, temperature)
    raise ValueError(f"divergence: expected forward_kl, reverse_kl or jsd (got {divergence!r})")


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
) -> jax.Array:
    """Soft-target loss T² · D(teacher ‖ student) at temperature T, averaged over real tokens.
    (Hinton et al.: the T² keeps gradient magnitudes comparable across temperatures.)"""
    d = token_divergence(student_logits, teacher_logits, temperature=temperature, divergence=divergence, beta=beta)
    return temperature**2 * masked_mean(d, mask)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """cos(a, b) over the last axis: ``[..., width] -> [...]``."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.sqrt((a * a).sum(-1) + eps)
    nb = jnp.sqrt((b * b).sum(-1) + eps)
    return (a * b).sum(-1) / (na * nb)


def cosine_loss(student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over real tokens of 1 − cos(h_s, h_t) (DistilBERT's hidden-state alignment); the two
    widths must match (project the student first when they do not)."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"cosine_loss: student width {student_hidden.shape[-1]} != teacher width {teacher_hidden.shape[-1]}; project the student's hidden states first"
        )
    return masked_mean(1.0 - cosine_similarity(student_hidden, teacher_hidden), mask)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    cos_weight: float = 0.0,
    student_hidden: Sequence[jax.Array] = (),
    teacher_hidden: Sequence[jax.Array] = (),
    temperature: float = 1.0,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
):
    """``ce_weight·CE + kd_weight·T²·D + cos_weight·mean_pairs(1 − cos)`` and its parts.

    ``student_hidden`` / ``teacher_hidden``: matching sequences of hidden states (already projected
    to the teacher's width). A term whose weight is 0 is not computed (reported as 0).
    Returns ``(loss, {"ce": ..., "kd": ..., "cos": ...})``.
    """
    zero = jnp.zeros((), jnp.float32)
    ce = cross_entropy(student_logits, targets, mask)[0] if ce_weight else zero
    kd = (
        kd_loss(student_logits, jax.lax.stop_gradient(teacher_logits), mask, temperature=temperature, divergence=divergence, beta=beta)
        if kd_weight
        else zero
    )
    cos = zero
    if cos_weight:
        if len(student_hidden) != len(teacher_hidden) or not student_hidden:
            raise ValueError(
                f"distillation_loss: {len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states; expected the same non-zero number"
            )
        cos = sum(cosine_loss(s, jax.lax.stop_gradient(t), mask) for s, t in zip(student_hidden, teacher_hidden))
        cos = cos / len(student_hidden)
    loss = ce_weight * ce + kd_weight * kd + cos_weight * cos
    return loss, {"ce": ce, "kd": kd, "cos": cos}
