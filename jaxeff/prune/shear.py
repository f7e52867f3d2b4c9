"""Sheared-LLaMA structured pruning (Xia et al., 2023): the ``shear`` training method.

The trained tree is ``{"model": model params, "shear": {"log_alpha": {type: ...}, "lambdas":
{type: f32[2]}}}``: hard-concrete mask parameters for each mask type the ``prune.target`` prunes
(:mod:`jaxeff.prune.hard_concrete`) and the Lagrange multipliers ``[λ1, λ2]`` of each type. Both
are parameters, so they are checkpointed, restored and (replicated) sharded like the model.

One jitted step minimises, over model weights and log α,

    loss = LM loss(model with sampled masks) + Σ_type λ1·(ŝ − t) + λ2·(ŝ − t)²

and *maximises* it over λ1, λ2 (gradient ascent): ŝ = 1 − mean keep-probability of that type's
entries, t = its target sparsity ``1 − target/source`` times ``min(1, step / warm-up)``
(warm-up = ``prune.warmup_fraction`` of ``train.steps``). The optimizer (the ``optimizer`` hook)
is one ``optax.multi_transform``: the trainer's optimizer for the model weights, adam at
``prune.mask_lr`` for log α followed by a clamp to [ln 0.01, ln 100], adam at ``-prune.lambda_lr``
for the λs.

Evaluation and generation (``Method.run``) use the deterministic masks of the target
architecture, i.e. exactly the model :func:`jaxeff.prune.extract.extract` would write now.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxeff.prune import hard_concrete as hc
from jaxeff.prune.config import PruneConfig, check_prune
from jaxeff.train.losses import cross_entropy
from jaxeff.train.methods import Method, MethodContext, forward_kwargs, register_method
from jaxeff.train.optim import make_optimizer


def init_shear(shapes: dict[str, tuple[int, ...]], rng, prune_cfg) -> dict:
    """The ``shear`` subtree: log α ~ N(init, std) per mask entry, λ1 = λ2 = 0 per mask type."""
    return {
        "log_alpha": hc.init_log_alpha(rng, shapes, prune_cfg.log_alpha_init, prune_cfg.log_alpha_init_std),
        "lambdas": {t: jnp.zeros((2,), jnp.float32) for t in shapes},
    }


def target_sparsity(sizes: dict[str, tuple[int, int]], step, warmup_steps: int) -> dict[str, jax.Array]:
    """Per type ``(1 − target/source) · min(1, step / warmup_steps)`` (no warm-up when 0)."""
    frac = 1.0 if warmup_steps <= 0 else jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
    return {t: (1.0 - tgt / src) * frac for t, (src, tgt) in sizes.items()}


def lagrangian(shear: dict, sizes: dict[str, tuple[int, int]], step, warmup_steps: int):
    """``(Σ_type λ1·(ŝ − t) + λ2·(ŝ − t)², metrics)`` for the ``shear`` subtree."""
    targets = target_sparsity(sizes, step, warmup_steps)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for t, la in shear["log_alpha"].items():
        s_hat = 1.0 - jnp.mean(hc.keep_prob(la))
        lam = shear["lambdas"][t]
        gap = s_hat - targets[t]
        total = total + lam[0] * gap + lam[1] * gap * gap
        metrics.update(
            {f"shear/sparsity/{t}": s_hat, f"shear/target_sparsity/{t}": targets[t], f"shear/lambda1/{t}": lam[0], f"shear/lambda2/{t}": lam[1]}
        )
    return total, metrics


def clamp_params(lo: float, hi: float) -> optax.GradientTransformation:
    """Rewrite updates so that ``params + updates`` lands in [lo, hi] (up to float rounding)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_params needs the parameters")
        return jax.tree.map(lambda u, p: jnp.clip(p + u, lo, hi) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def shear_optimizer(prune_cfg, optim_cfg, total_steps: int, trainable) -> optax.GradientTransformation:
    """Model weights: the trainer's optimizer (frozen ones: no update); log α: adam at
    ``mask_lr`` then the clamp; λ: adam at ``-lambda_lr`` (ascent)."""
    model_labels = jax.tree.map(lambda t: "model" if t else "frozen", trainable["model"])
    labels = {
        "model": model_labels,
        "shear": {
            "log_alpha": jax.tree.map(lambda _: "log_alpha", trainable["shear"]["log_alpha"]),
            "lambdas": jax.tree.map(lambda _: "lambda", trainable["shear"]["lambdas"]),
        },
    }
    return optax.multi_transform(
        {
            "model": make_optimizer(optim_cfg, total_steps),
            "frozen": optax.set_to_zero(),
            "log_alpha": optax.chain(optax.adam(prune_cfg.mask_lr), clamp_params(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX)),
            "lambda": optax.adam(-prune_cfg.lambda_lr),
        },
        labels,
    )


def final_masks(shear: dict, sizes: dict[str, tuple[int, int]]) -> dict[str, jax.Array]:
    """Deterministic masks of every pruned type (exactly the target counts per row)."""
    return hc.deterministic_masks(shear["log_alpha"], {t: tgt for t, (_, tgt) in sizes.items()})


def apply_masked(model, params, tokens, masks, **kwargs):
    """The source model run with mask types ``masks`` (see :func:`hard_concrete.model_masks`)."""
    return model.apply({"params": params["model"]}, tokens, masks=hc.model_masks(masks, model.config), **kwargs)


def warmup_steps(prune_cfg, total_steps: int) -> int:
    return math.ceil(prune_cfg.warmup_fraction * total_steps)


@register_method("shear", config=PruneConfig, section="prune")
def shear_method(ctx: MethodContext) -> Method:
    """Hard-concrete masks + Lagrangian towards ``prune.target``; see the module docstring."""
    cfg, model = ctx.cfg, ctx.model
    p = cfg.prune
    sizes = check_prune(cfg)
    shapes = hc.mask_shapes(cfg.model, sizes)
    warm = warmup_steps(p, cfg.train.steps)
    target_params = float(hc.expected_params({t: hc.keep_top(jnp.zeros(s), sizes[t][1]) for t, s in shapes.items()}, cfg.model))

    def prepare_params(base, rng):
        return {"model": base, "shear": init_shear(shapes, rng, p)}

    def loss(params, batch, rng, *, frozen, deterministic, step):
        shear = params["shear"]
        if deterministic:
            masks = final_masks(shear, sizes)
        else:
            masks = hc.sample_masks(shear["log_alpha"], jax.random.fold_in(rng, 1))
        out = apply_masked(model, params, batch["inputs"], masks, **forward_kwargs(batch, rng, deterministic))
        lm, _ = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        lag, metrics = lagrangian(shear, sizes, step, warm)
        probs = {t: hc.keep_prob(la) for t, la in shear["log_alpha"].items()}
        metrics.update(
            {
                "shear/lm_loss": lm,
                "shear/lagrangian": lag,
                "shear/expected_params": hc.expected_params(probs, cfg.model),
                "shear/target_params": jnp.float32(target_params),
            }
        )
        return lm + lag, metrics

    def trainable(params):
        return {"model": jax.tree.map(lambda _: p.train_model, params["model"]), "shear": jax.tree.map(lambda _: True, params["shear"])}

    def logical_axes(model_axes):
        return {"model": model_axes, "shear": {"log_alpha": {t: P() for t in shapes}, "lambdas": {t: P() for t in shapes}}}

    def apply(model_, params, tokens, **kwargs):
        return apply_masked(model_, params, tokens, final_masks(params["shear"], sizes), **kwargs)

    return Method(
        "shear",
        loss,
        trainable=trainable,
        prepare_params=prepare_params,
        logical_axes=logical_axes,
        model_params=lambda params: params["model"],
        apply=apply,
        with_step=True,
        optimizer=lambda optim_cfg, total_steps, trainable_tree: shear_optimizer(p, optim_cfg, total_steps, trainable_tree),
    )


__all__ = ["shear_method", "init_shear", "lagrangian", "target_sparsity", "shear_optimizer", "clamp_params", "final_masks", "apply_masked", "warmup_steps"]
