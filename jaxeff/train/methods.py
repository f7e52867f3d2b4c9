"""The method interface: how a training method plugs into the shared trainer.

A method is a few pure functions and data, not a subclass of the trainer:

- ``loss(params, batch, rng, *, frozen, deterministic) -> (loss, metrics)``: the scalar to
  minimise and a dict of scalar metrics. ``frozen`` is the method's read-only arrays (e.g. a
  teacher's parameters; passed to every step, sharded, never checkpointed). State a method trains or
  updates (Lagrange multipliers, masks, rewind points) lives in the prepared parameter tree, with
  ``trainable`` saying which of it the optimizer touches: one tree, checkpointed as a whole.
- ``trainable(params) -> bool tree``: which parameters the optimizer updates; the others get no
  optimizer state and never change.
- ``prepare_params(params, rng) -> params``: turns the model's parameters (fresh or loaded with
  ``train.init_from``) into the trained tree, e.g. adds LoRA adapters. Runs under ``jit``.
- ``logical_axes(model_axes) -> axes``: logical axis names of the prepared tree (default: same).
- ``model_params(params) -> params``: the plain model parameters the prepared tree stands for
  (e.g. base + merged adapters); evaluation and generation apply the model to these.
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
- ``hooks``: :class:`jaxeff.train.loop.Hook` s the training loop runs after its log/eval hooks and
  before it checkpoints (e.g. a pruning round that rewrites ``loop.state`` every N steps).
- ``schedule``: the learning rate at an update (what ``train/lr`` logs) for a method whose
  ``optimizer`` schedules it differently from ``optim`` over the whole run.

A method is one file: it declares its config section (a :class:`jaxeff.schema.Section`) and
registers its factory ``factory(cfg, model) -> Method`` with it::

    class MyConfig(Section):
        alpha: float = 0.5

    @register_method("mine", config=MyConfig)      # YAML: method: mine, and a `mine:` section
    def mine(cfg, model) -> Method:
        ...

The experiment schema (:class:`jaxeff.config.ExperimentConfig`) is built from the registry: the
built-in modules below are imported, then every module of the ``jaxeff.methods`` entry-point group
(a method in another package: ``[project.entry-points."jaxeff.methods"] mine = "mypkg.mine"``), then
the modules named in the environment variable ``JAXEFF_METHOD_MODULES`` (comma-separated; a method
file of your own, no packaging: see docs/methods.md).
Several methods may share one section (``lora``, ``qlora`` and ``bitfit`` read ``peft``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

import jax

from jaxeff.train.losses import cross_entropy

_REGISTRY: dict[str, Callable[..., "Method"]] = {}
_SECTIONS: dict[str, type] = {}  # config section key -> its Section class

# the modules that register the shipped methods (a new built-in method: its file, and one line here)
BUILTIN_METHOD_MODULES = (
    "jaxeff.train.methods",  # lm
    "jaxeff.distill.method",  # distill
    "jaxeff.peft.lora",  # lora (peft:)
    "jaxeff.peft.qlora",  # qlora
    "jaxeff.peft.bitfit",  # bitfit
    "jaxeff.quant.qat",  # qat (quant:)
    "jaxeff.quant.convert",  # quantized
    "jaxeff.prune.shear",  # shear (prune:)
    "jaxeff.ttt.method",  # ttt_e2e (ttt:)
    "jaxeff.distill.step_by_step",  # step_by_step
    "jaxeff.prune.lottery",  # lottery
    "jaxeff.decode.medusa",  # medusa (medusa:)
)
ENTRY_POINT_GROUP = "jaxeff.methods"
ENV_MODULES = "JAXEFF_METHOD_MODULES"
_loaded = False


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
    frozen: Any = None
    frozen_logical_axes: Any = None
    apply: Callable[..., Any] | None = None
    with_step: bool = False
    optimizer: Callable[..., Any] | None = None
    hooks: tuple = ()
    schedule: Callable[[int], Any] | None = None  # the learning rate at an update, when not optim's over the run

    def run(self, model, params, tokens, **kwargs):
        """The model's output for the prepared parameter tree (see ``apply``)."""
        if self.apply is not None:
            return self.apply(model, params, tokens, **kwargs)
        return model.apply({"params": self.model_params(params)}, tokens, **kwargs)


def register_method(name: str, *, config: type | None = None, section: str | None = None):
    """Register ``factory(cfg, model) -> Method`` as method ``name``; ``config`` is its config section
    class, read from the experiment key ``section`` (default: ``name``)."""
    key = section or name
    if config is None and section is not None:
        raise ValueError(f"register_method('{name}'): section='{section}' needs its config class")

    def deco(factory):
        if config is not None:
            known = _SECTIONS.get(key)
            reloaded = known is not None and (known.__module__, known.__qualname__) == (config.__module__, config.__qualname__)
            if known is not None and known is not config and not reloaded:  # (a re-imported module replaces its own)
                raise ValueError(f"register_method('{name}'): section '{key}' is already {known.__name__}")
            _SECTIONS[key] = config
        _REGISTRY[name] = factory
        return factory

    return deco


def load_methods() -> None:
    """Import the built-in method modules and the ``jaxeff.methods`` entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a method module importing the config while it loads must not recurse
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for module in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            from jaxeff.errors import ConfigError

            raise ConfigError(f"{ENV_MODULES}: cannot import method module '{module}' ({e})") from None


def method_names() -> list[str]:
    load_methods()
    return list(_REGISTRY)


def method_sections() -> dict[str, type]:
    """Section key -> config class of every registered method (what the schema is built from), by key
    (whatever order the modules were imported in)."""
    load_methods()
    return dict(sorted(_SECTIONS.items()))


def make_method(cfg, model) -> Method:
    load_methods()
    if cfg.method not in _REGISTRY:
        raise KeyError(f"method: unknown method '{cfg.method}' (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.method](cfg, model)


def lm_forward_loss(model, params, batch, rng, deterministic):
    out = model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    return loss, n


@register_method("lm")
def lm_method(cfg, model) -> Method:
    """Plain next-token language modelling."""

    def loss(params, batch, rng, *, frozen, deterministic):
        value, _ = lm_forward_loss(model, params, batch, rng, deterministic)
        return value, {}

    return Method("lm", loss)
