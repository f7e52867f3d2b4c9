"""The method interface: how a training method plugs into the shared trainer.

A method is a few pure functions and data, not a subclass of the trainer:

- ``loss(params, batch, rng, *, extra, frozen, deterministic) -> (loss, metrics)``: the scalar to
  minimise and a dict of scalar metrics. ``extra`` is the method's own trained/updated state
  (e.g. Lagrange multipliers; checkpointed), ``frozen`` its read-only arrays (e.g. a teacher's
  parameters; passed to every step, sharded, never checkpointed).
- ``trainable(params) -> bool tree``: which parameters the optimizer updates; the others get no
  optimizer state and never change.
- ``prepare_params(params, rng) -> params``: turns the model's parameters (fresh or loaded with
  ``train.init_from``) into the trained tree, e.g. adds LoRA adapters. Runs under ``jit``.
- ``logical_axes(model_axes) -> axes``: logical axis names of the prepared tree (default: same).
- ``model_params(params) -> params``: the plain model parameters the prepared tree stands for
  (e.g. base + merged adapters); evaluation and generation apply the model to these.
- ``init_extra(params) -> pytree``: initial ``extra`` (under ``jit``; default ``{}``).
- ``apply(model, params, tokens, **kwargs) -> TransformerOutput``: how evaluation and generation
  run the model on the prepared tree (default: ``model.apply`` on ``model_params(params)``); a
  method that changes the computation (fake quantization, unmerged adapters via
  ``flax.linen.intercept_methods``) overrides it and uses it in its loss too.
- ``frozen`` / ``frozen_logical_axes``: the read-only arrays and their logical axis names.
- ``with_step``: when true, ``loss`` also receives ``step=`` (int32 scalar: updates done so far), for
  schedules inside the loss (e.g. a warm-up of an inner learning rate or of a pruning target).
- ``optimizer(optim_cfg, total_steps, trainable) -> optax.GradientTransformation``: replaces the
  trainer's optimizer (default: :func:`jaxeff.train.optim.make_optimizer`), for methods whose
  parameter groups need their own rules (e.g. Lagrange multipliers trained by gradient ascent).

Methods register a factory ``factory(cfg, model) -> Method`` under their config name, in the
module that ``jaxeff.config.METHOD_MODULES`` names for it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax

from jaxeff.train.losses import cross_entropy

_REGISTRY: dict[str, Callable[..., "Method"]] = {}


def _identity(x, *args):
    return x


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: it may hold arrays (frozen)
class Method:
    name: str
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    trainable: Callable[[Any], Any] = lambda params: jax.tree.map(lambda _: True, params)
    prepare_params: Callable[[Any, jax.Array], Any] = _identity
    logical_axes: Callable[[Any], Any] = _identity
    model_params: Callable[[Any], Any] = _identity
    init_extra: Callable[[Any], Any] = lambda params: {}
    frozen: Any = None
    frozen_logical_axes: Any = None
    apply: Callable[..., Any] | None = None
    with_step: bool = False
    optimizer: Callable[..., Any] | None = None

    def run(self, model, params, tokens, **kwargs):
        """The model's output for the prepared parameter tree (see ``apply``)."""
        if self.apply is not None:
            return self.apply(model, params, tokens, **kwargs)
        return model.apply({"params": self.model_params(params)}, tokens, **kwargs)


def register_method(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def make_method(cfg, model) -> Method:
    from jaxeff.config import METHOD_MODULES

    module = METHOD_MODULES.get(cfg.method)
    if module:
        importlib.import_module(module)
    if cfg.method not in _REGISTRY:
        raise KeyError(f"method: unknown method '{cfg.method}' (expected one of {', '.join(sorted(METHOD_MODULES))})")
    return _REGISTRY[cfg.method](cfg, model)


def lm_forward_loss(model, params, batch, rng, deterministic):
    out = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs={"dropout": rng})
    loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    return loss, n


@register_method("lm")
def lm_method(cfg, model) -> Method:
    """Plain next-token language modelling."""
    def loss(params, batch, rng, *, extra, frozen, deterministic):
        value, _ = lm_forward_loss(model, params, batch, rng, deterministic)
        return value, {}
    return Method("lm", loss)
