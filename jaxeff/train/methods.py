"""The method interface: how a training method plugs into the shared trainer.

A method is a few pure functions, not a subclass of the trainer:

- ``loss(params, batch, rng, *, extra, deterministic) -> (loss, metrics)``: the scalar to minimise
  and a dict of scalar metrics; ``extra`` is the method's own state (e.g. Lagrange multipliers).
- ``trainable(params) -> bool tree``: which parameters the optimizer updates; the others get no
  optimizer state and never change.
- ``init_extra(params) -> pytree``: initial method state (checkpointed with the train state).

Methods register a factory ``factory(cfg, model) -> Method`` under their config name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxeff.train.losses import cross_entropy

_REGISTRY: dict[str, Callable[..., "Method"]] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    trainable: Callable[[Any], Any] = lambda params: jax.tree.map(lambda _: True, params)
    init_extra: Callable[[Any], Any] = lambda params: {}


def register_method(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def make_method(cfg, model) -> Method:
    if cfg.method not in _REGISTRY:
        raise KeyError(f"method: unknown method '{cfg.method}' (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.method](cfg, model)


def lm_forward_loss(model, params, batch, rng, deterministic):
    out = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs={"dropout": rng})
    loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    return loss, n


@register_method("lm")
def lm_method(cfg, model) -> Method:
    """Plain next-token language modelling."""
    def loss(params, batch, rng, *, extra, deterministic):
        value, n = lm_forward_loss(model, params, batch, rng, deterministic)
        return value, {}
    return Method("lm", loss)
