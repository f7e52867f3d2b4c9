"""optax optimizers and schedules from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxeff.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up (``lr·(step+1)/warmup_steps``, so the first update is not wasted at lr 0),
    then constant, cosine or linear decay to ``min_lr_ratio·lr`` at the last step."""
    warm = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warm, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    if warm == 0:
        return main
    return lambda step: jnp.where(step < warm, cfg.lr * (step + 1) / warm, main(step - warm))


def decay_mask(params, decay_embeddings: bool = True):
    """Weight decay on matrices only (ndim >= 2); never on norm scales or biases."""

    def want(path, x):
        if x.ndim < 2:
            return False
        names = [getattr(k, "key", None) for k in path]
        return decay_embeddings or "embed" not in names

    return jax.tree_util.tree_map_with_path(want, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, trainable=None) -> optax.GradientTransformation:
    """The full update rule: clip -> optimizer (with schedule, masked weight decay).

    ``trainable`` is a bool tree like the params (or None = all): frozen leaves get no optimizer
    state and a zero update, so they stay bit-for-bit unchanged.
    """
    sched = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    elif cfg.name == "adam":
        opt = optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "lion":
        opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    else:
        opt = optax.sgd(sched, momentum=cfg.momentum or None)
        if cfg.weight_decay:
            opt = optax.chain(optax.masked(optax.add_decayed_weights(cfg.weight_decay), lambda p: decay_mask(p, cfg.decay_embeddings)), opt)
    if cfg.grad_clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    if trainable is None:
        return opt
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
