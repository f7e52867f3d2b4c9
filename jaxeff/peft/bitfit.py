"""BitFit (Ben Zaken et al., 2022): train only the bias terms (optionally also the norm scales).

The model must be built with ``model.use_bias: true``; everything else stays frozen and gets no
optimizer state.
"""

from __future__ import annotations

import jax

from jaxeff.peft.config import PeftConfig
from jaxeff.errors import ConfigError
from jaxeff.train.methods import Method, MethodContext, lm_forward_loss, register_method


def bitfit_mask(params, train_norms: bool = False):
    """True for every ``bias`` leaf (and every norm ``scale`` when ``train_norms``)."""
    names = ("bias", "scale") if train_norms else ("bias",)

    def want(path, _):
        return getattr(path[-1], "key", None) in names

    return jax.tree_util.tree_map_with_path(want, params)


@register_method("bitfit", config=PeftConfig, section="peft")
def bitfit_method(ctx: MethodContext) -> Method:
    cfg, model = ctx.cfg, ctx.model
    if not cfg.model.use_bias:
        raise ConfigError("model.use_bias: method bitfit trains only biases; expected model.use_bias=true (and a base checkpoint built with biases)")

    def loss(params, batch, rng, *, frozen, deterministic):
        value, _ = lm_forward_loss(model, params, batch, rng, deterministic)
        return value, {}

    return Method("bitfit", loss, trainable=lambda params: bitfit_mask(params, cfg.peft.train_norms))
