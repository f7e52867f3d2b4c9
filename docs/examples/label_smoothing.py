"""A whole training method in one file: label-smoothed next-token loss (Szegedy et al. 2016).

    PYTHONPATH=docs/examples JAXEFF_METHOD_MODULES=label_smoothing \\
        jaxeff train configs/quickstart.yaml method=label_smoothing label_smoothing.epsilon=0.1

The file declares its config section and registers its factory with it; the experiment schema gains
a ``label_smoothing:`` section (validated like any other: ``label_smoothing.epsilon=2`` is a one-line
error) and ``method: label_smoothing`` becomes valid. Nothing else in jaxeff changes.
"""

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxeff.schema import Section
from jaxeff.train.methods import Method, MethodContext, lm_forward, register_method


class LabelSmoothingConfig(Section):
    epsilon: float = Field(0.1, ge=0.0, lt=1.0)  # probability mass spread uniformly over the vocabulary


@register_method("label_smoothing", config=LabelSmoothingConfig)
def label_smoothing_method(ctx: MethodContext) -> Method:
    model, eps = ctx.model, ctx.cfg.label_smoothing.epsilon

    def loss(params, batch, rng, *, frozen, deterministic):
        out = lm_forward(model, params, batch, rng, deterministic)  # model.apply on the batch, dropout from rng
        logits = out.logits.astype(jnp.float32)
        labels = optax.smooth_labels(jax.nn.one_hot(batch["targets"], logits.shape[-1]), eps)
        per_token = optax.softmax_cross_entropy(logits, labels)
        mask = batch["loss_mask"].astype(jnp.float32)
        value = (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        return value, {"smoothing": jnp.asarray(eps, jnp.float32)}

    return Method("label_smoothing", loss)
