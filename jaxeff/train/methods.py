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
- ``frozen`` / ``frozen_logical_axes``: the read-only arrays and their logical axis names; ``frozen``
  may be a zero-argument callable, called only by a trainer built to train (``ctx.purpose``).
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
registers its factory ``factory(ctx) -> Method`` with it::

    class MyConfig(Section):
        alpha: float = 0.5

    @register_method("mine", config=MyConfig)      # YAML: method: mine, and a `mine:` section
    def mine(ctx: MethodContext) -> Method:
        ...

The factory's :class:`MethodContext` holds what the trainer has already worked out: the config, the
model, the model's parameters as ShapeDtypeStructs and their logical axes, ``base_params()`` (the
parameters the run starts from, loaded once on first call and shared with the trainer) and
``purpose`` ("train", or "load" when a tool only reads a saved run: no teacher or other
training-only input need be read then). A factory written the old way, ``factory(cfg, model)``, still
works (told once by a DeprecationWarning); a registered factory may also be called as
``factory(cfg, model)``, e.g. by a method that wraps another.

The experiment schema (:class:`jaxeff.config.ExperimentConfig`) is built from the registry: the
built-in modules below are imported, then every module of the ``jaxeff.methods`` entry-point group
(a method in another package: ``[project.entry-points."jaxeff.methods"] mine = "mypkg.mine"``), then
the modules named in the environment variable ``JAXEFF_METHOD_MODULES`` (comma-separated; a method
file of your own, no packaging: see docs/methods.md).
Several methods may share one section (``lora``, ``qlora`` and ``bitfit`` read ``peft``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import warnings
from typing import Any, Callable

import jax

from jaxeff.train.losses import cross_entropy

_REGISTRY: dict[str, Callable[["MethodContext"], "Method"]] = {}  # name -> factory(ctx)
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


PURPOSES = ("train", "load")


@dataclasses.dataclass(frozen=True, eq=False)
class MethodContext:
    """What a method factory is given, worked out once by the trainer.

    - ``cfg``, ``model``: the experiment config and the :class:`jaxeff.models.Transformer`;
    - ``abstract_params``: the model's parameters as ``jax.ShapeDtypeStruct`` s (nothing allocated);
    - ``model_axes``: their logical axis names (a tree of ``PartitionSpec``);
    - ``base_params()``: the model parameters the run starts from: ``train.init_from``'s (placed with
      the run's base shardings), else the seeded initialisation the trainer would use. Read on the
      first call only; the trainer initialises its state from the same arrays, so a method that needs
      the base (QLoRA quantizes it) and the trainer read the checkpoint once;
    - ``purpose``: ``"train"`` (a run that trains) or ``"load"`` (a tool reading a saved run: eval,
      generate, export, ``jaxeff.runs``): a factory then skips inputs only training needs (a
      distillation teacher), so a run stays readable when they are gone.
    """

    cfg: Any
    model: Any
    abstract_params: Any
    model_axes: Any
    purpose: str = "train"
    read_base: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)  # the loader behind base_params()
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.purpose not in PURPOSES:
            raise ValueError(f"MethodContext.purpose: expected one of {', '.join(PURPOSES)} (got {self.purpose!r})")

    @property
    def training(self) -> bool:
        return self.purpose == "train"

    def base_params(self):
        """The run's starting model parameters (see the class doc), loaded on the first call."""
        if "base" not in self._cache:
            self._cache["base"] = (self.read_base or functools.partial(_one_device_base, self))()
        return self._cache["base"]

    @property
    def has_base(self) -> bool:
        """Whether ``base_params()`` has been loaded (and not released)."""
        return "base" in self._cache

    def release_base(self) -> None:
        """Forget the loaded base (the trainer calls this once its state is built, to free it)."""
        self._cache.pop("base", None)

    @classmethod
    def for_model(cls, cfg, model, *, purpose: str = "train") -> "MethodContext":
        """A context outside a trainer (tests, a method calling another's factory): shapes and axes
        from ``model`` (none when it is None); ``base_params()`` on the first device."""
        if model is None:
            return cls(cfg, None, None, None, purpose)
        from jaxeff.models import init_params, logical_axes

        key, shape = jax.random.PRNGKey(cfg.seed), (1, cfg.data.seq_len)
        return cls(cfg, model, jax.eval_shape(lambda: init_params(model, key, shape)), logical_axes(model, shape), purpose)


def _one_device_base(ctx: MethodContext):
    from jaxeff.models import init_params

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if ctx.cfg.train.init_from:
        from jaxeff.train.runtime import read_base_params

        return read_base_params(ctx.cfg, ctx.cfg.train.init_from, ctx.abstract_params, jax.tree.map(lambda _: one, ctx.abstract_params))
    init = jax.jit(lambda: init_params(ctx.model, jax.random.PRNGKey(ctx.cfg.seed), (1, ctx.cfg.data.seq_len)), out_shardings=one)
    return init()


def _takes_context(factory) -> bool:
    """A factory with one required positional parameter is ``factory(ctx)``; two is the old
    ``factory(cfg, model)``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in params) == 1


def register_method(name: str, *, config: type | None = None, section: str | None = None):
    """Register ``factory(ctx: MethodContext) -> Method`` as method ``name``; ``config`` is its config
    section class, read from the experiment key ``section`` (default: ``name``). An old-style
    ``factory(cfg, model)`` is still accepted, with a DeprecationWarning. The decorated function may
    be called as ``factory(ctx)`` or ``factory(cfg, model)`` (a context is then built for it)."""
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
        if not _takes_context(factory):
            warnings.warn(
                f"register_method('{name}'): factory(cfg, model) is deprecated; write factory(ctx) and read ctx.cfg, ctx.model "
                "(jaxeff.train.methods.MethodContext)",
                DeprecationWarning,
                stacklevel=2,
            )
            _REGISTRY[name] = lambda ctx: factory(ctx.cfg, ctx.model)
            return factory

        @functools.wraps(factory)
        def call(*args, **kwargs):
            if len(args) == 2 and not kwargs:  # factory(cfg, model)
                return factory(MethodContext.for_model(*args))
            return factory(*args, **kwargs)

        _REGISTRY[name] = factory
        return call

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


def make_method(ctx: MethodContext | Any, model=None, *, purpose: str = "train") -> Method:
    """The method ``ctx.cfg.method`` built by its factory; ``make_method(cfg, model)`` builds the
    context itself (:meth:`MethodContext.for_model`)."""
    if not isinstance(ctx, MethodContext):
        ctx = MethodContext.for_model(ctx, model, purpose=purpose)
    load_methods()
    name = ctx.cfg.method
    if name not in _REGISTRY:
        raise KeyError(f"method: unknown method '{name}' (expected one of {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](ctx)


def forward_kwargs(batch, rng, deterministic: bool) -> dict:
    """Keyword arguments of a forward pass over a packed training batch: its positions and segments,
    and dropout (keyed by ``rng``) unless ``deterministic``."""
    return {"positions": batch["positions"], "segment_ids": batch["segment_ids"], "deterministic": deterministic, "rngs": {"dropout": rng}}


def lm_forward(model, params, batch, rng, deterministic: bool, **kwargs):
    """``model.apply`` on a training batch's inputs (see :func:`forward_kwargs`); ``kwargs`` go to the
    model (e.g. ``return_hidden=True``)."""
    return model.apply({"params": params}, batch["inputs"], **forward_kwargs(batch, rng, deterministic), **kwargs)


def lm_forward_loss(model, params, batch, rng, deterministic):
    out = lm_forward(model, params, batch, rng, deterministic)
    loss, n = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    return loss, n


@register_method("lm")
def lm_method(ctx: MethodContext) -> Method:
    """Plain next-token language modelling."""
    model = ctx.model

    def loss(params, batch, rng, *, frozen, deterministic):
        value, _ = lm_forward_loss(model, params, batch, rng, deterministic)
        return value, {}

    return Method("lm", loss)
