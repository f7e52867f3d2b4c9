"""LoRA as a parameter-tree transform, and the ``lora`` training method.

A LoRA adapter for a ``Dense`` kernel ``W [in, out]`` is ``A [in, rank]`` (random) and
``B [rank, out]`` (zeros), and the layer computes ``x W + (alpha / rank) · (x A) B``; with B = 0
the adapted model starts as the base exactly. Adapters live in a tree that mirrors the module
paths of the kernels they adapt::

    adapters = {"layers_0": {"attn": {"q": {"a": [in, rank], "b": [rank, out]}, ...}, ...}, ...}

Which kernels get one is chosen by regexes over module paths (``layers_0/attn/q``), qwix-style,
so the model is never edited: the adapted computation is injected at run time with
:func:`jaxeff.dense.intercept_dense` (:func:`lora_interceptor`), or folded into the kernels with
:func:`merge` (and taken out again with :func:`unmerge`).

The trained tree of the ``lora`` method is ``{"model": model params (frozen), "lora": adapters}``;
only ``lora`` gets optimizer state.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jaxeff.dense import intercept_dense
from jaxeff.peft.config import PeftConfig
from jaxeff.errors import ConfigError
from jaxeff.targets import select
from jaxeff.train.methods import Method, MethodContext, lm_forward_loss, register_method

Path = tuple[str, ...]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------
# targets


def target_paths(params, targets: Iterable[str]) -> list[Path]:
    """Module paths (tuples) of the Dense layers a ``peft.targets`` rule selects (:mod:`jaxeff.targets`:
    full match of ``layers_0/attn/q``); ConfigError if none."""
    return [tuple(p.split("/")) for p in select(params, tuple(targets), "peft.targets", required=True)]


# ------------------------------------------------------------------------------------------------
# adapters as a tree transform


def _get(tree, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def init_adapters(params, paths: Iterable[Path], rank: int, rng, dtype=jnp.float32):
    """``{path: {"a": U(-1/sqrt(in), 1/sqrt(in)) [in, rank], "b": zeros [rank, out]}}`` (nested)."""
    flat = {}
    for i, path in enumerate(paths):
        d_in, d_out = _get(params, path)["kernel"].shape
        bound = d_in**-0.5
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, rank), jnp.float32, -bound, bound)
        flat[path + ("a",)] = a.astype(dtype)
        flat[path + ("b",)] = jnp.zeros((rank, d_out), dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_paths(adapters) -> list[Path]:
    return sorted({k[:-1] for k in traverse_util.flatten_dict(adapters)})


def adapter_axes(model_axes, adapters):
    """Logical axes of an adapter tree: A takes the kernel's input axis, B its output axis."""
    flat = {}
    for path in adapter_paths(adapters):
        spec = tuple(_get(model_axes, path)["kernel"])
        flat[path + ("a",)] = P(spec[0], None)
        flat[path + ("b",)] = P(None, spec[1])
    return traverse_util.unflatten_dict(flat)


def delta(adapter, scale: float, dtype=jnp.float32) -> jax.Array:
    """``scale · A B`` [in, out], computed in float32."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    return (scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)).astype(dtype)


def _fold(params, adapters, scale: float, sign: float):
    flat = traverse_util.flatten_dict(params)
    for path in adapter_paths(adapters):
        key = path + ("kernel",)
        if key not in flat:
            raise ValueError(f"adapter for '{'/'.join(path)}' has no kernel in the parameters")
        w = flat[key]
        flat[key] = (w.astype(jnp.float32) + sign * delta(_get(adapters, path), scale)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params, adapters, scale: float):
    """Model parameters with ``scale · A B`` folded into each adapted kernel (a new tree)."""
    return _fold(params, adapters, scale, 1.0)


def unmerge(params, adapters, scale: float):
    """Inverse of :func:`merge` (exact up to float rounding of the kernels)."""
    return _fold(params, adapters, scale, -1.0)


def switch(params, old, new, scale_old: float, scale_new: float | None = None):
    """Merged parameters of one adapter -> merged parameters of another, on the same base."""
    return merge(unmerge(params, old, scale_old), new, scale_old if scale_new is None else scale_new)


# ------------------------------------------------------------------------------------------------
# the adapted computation, injected into nn.Dense


def lora_interceptor(adapters, scale: float, *, dropout: float = 0.0, rng=None, qbase=None, backend: str = "reference", compute_dtype=None):
    """A context in which every ``nn.Dense`` whose module path has an adapter computes
    ``x W + b + scale · (dropout(x) A) B``. With ``qbase`` (a tree of ``QuantizedWeight`` by module
    path, see :mod:`jaxeff.peft.qlora`) the kernel of those layers is the quantized one, multiplied
    by ``pallas_kernels.quantized_matmul`` (their float ``kernel`` is never read, and need not exist).
    ``compute_dtype`` (default: the layer's) is the dtype of the matmuls. LoRA's parts of
    :func:`jaxeff.dense.intercept_dense` (pass them there to combine LoRA with fake quant or statistics)."""
    return intercept_dense(**lora_parts(adapters, qbase), lora_scale=scale, dropout=dropout, rng=rng, backend=backend, compute_dtype=compute_dtype)


def lora_parts(adapters, qbase=None) -> dict[str, dict]:
    """The ``lora`` (and, with ``qbase``, ``kernel``) parts of :func:`jaxeff.dense.intercept_dense`, by path."""
    parts = {"lora": {"/".join(p): _get(adapters, p) for p in adapter_paths(adapters)} if adapters else {}}
    if qbase is not None:
        from pallas_kernels.quant import QuantizedWeight

        parts["kernel"] = {"/".join(p): w for p, w in _flatten_until(qbase, QuantizedWeight).items()}
    return parts


def _flatten_until(tree, leaf_type) -> dict[Path, Any]:
    out = {}

    def walk(node, path):
        if isinstance(node, leaf_type):
            out[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))

    walk(tree, ())
    return out


def apply_lora(model, params, adapters, scale: float, tokens, **kwargs):
    """The model's output with unmerged adapters (the base ``params`` are untouched)."""
    with lora_interceptor(adapters, scale):
        return model.apply({"params": params}, tokens, **kwargs)


# ------------------------------------------------------------------------------------------------
# the method


def lora_scale(peft_cfg) -> float:
    return peft_cfg.alpha / peft_cfg.rank


def adapter_dtype(peft_cfg, default: str):
    return _DTYPES[peft_cfg.adapter_dtype or default]


def initial_adapters(cfg, like, paths: list[Path]):
    """The adapters of ``peft.init_adapter`` (numpy, nested by module path) for a run whose base
    has the parameters (or ShapeDtypeStructs) ``like`` and whose targets are ``paths``; None
    without it. Its rank and scale must be the run's, its modules among the targets (else one
    ConfigError line naming the key); a jaxeff adapter's base model config must be the run's."""
    p = cfg.peft
    if not p.init_adapter:
        return None
    from pathlib import Path as FsPath

    from jaxeff.peft.adapters import load_adapter, read_meta
    from jaxeff.train.checkpoint import check_same_model

    where = p.init_adapter
    meta = read_meta(where)
    if int(meta["rank"]) != p.rank:
        raise ConfigError(f"peft.rank: {p.rank}, but the adapter in peft.init_adapter '{where}' has rank (r) {meta['rank']}: set peft.rank={meta['rank']}")
    scale = lora_scale(p)
    if abs(float(meta["scale"]) - scale) > 1e-6 * scale:
        raise ConfigError(
            f"peft.alpha: {p.alpha:g} gives scale {scale:g}, but the adapter in peft.init_adapter "
            f"'{where}' has scale {float(meta['scale']):g}: set peft.alpha={float(meta['scale']) * p.rank:g}"
        )
    if meta.get("base_model"):
        check_same_model({"model": meta["base_model"]}, cfg.to_dict()["model"], FsPath(where))
    adapters, _ = load_adapter(where, like=like)
    extra = sorted(set(adapter_paths(adapters)) - set(paths))
    if extra:
        raise ConfigError(
            f"peft.targets: the adapter in peft.init_adapter '{where}' adapts {'/'.join(extra[0])}, which no target matches ({len(extra)} such modules)"
        )
    return jax.tree.map(np.asarray, adapters)


def with_initial(adapters, initial, dtype):
    """``adapters`` with the modules of ``initial`` replaced by its arrays (cast to ``dtype``)."""
    if initial is None:
        return adapters
    flat = traverse_util.flatten_dict(adapters)
    for key, value in traverse_util.flatten_dict(initial).items():
        flat[key] = jnp.asarray(value).astype(dtype)
    return traverse_util.unflatten_dict(flat)


def _mask(tree, value: bool):
    return jax.tree.map(lambda _: value, tree)


@register_method("lora", config=PeftConfig, section="peft")
def lora_method(ctx: MethodContext) -> Method:
    """LoRA on the kernels that ``peft.targets`` select; the base is frozen."""
    cfg, model = ctx.cfg, ctx.model
    p = cfg.peft
    scale = lora_scale(p)
    like = ctx.abstract_params
    paths = target_paths(like, p.targets)
    dtype = adapter_dtype(p, "float32")
    initial = initial_adapters(cfg, like, paths)

    def prepare_params(base, rng):
        return {"model": base, "lora": with_initial(init_adapters(base, paths, p.rank, rng, dtype), initial, dtype)}

    def loss(params, batch, rng, *, frozen, deterministic):
        drop = 0.0 if deterministic else p.dropout
        with lora_interceptor(params["lora"], scale, dropout=drop, rng=jax.random.fold_in(rng, 1)):
            value, _ = lm_forward_loss(model, params["model"], batch, rng, deterministic)
        return value, {}

    def apply(model_, params, tokens, **kwargs):
        return apply_lora(model_, params["model"], params["lora"], scale, tokens, **kwargs)

    return Method(
        "lora",
        loss,
        trainable=lambda params: {"model": _mask(params["model"], False), "lora": _mask(params["lora"], True)},
        prepare_params=prepare_params,
        logical_axes=lambda axes: {"model": axes, "lora": adapter_axes(axes, _placeholder(paths))},
        model_params=lambda params: merge(params["model"], params["lora"], scale),
        apply=apply,
    )


def _placeholder(paths: Iterable[Path]):
    """An adapter-shaped tree (values unused) for :func:`adapter_axes`."""
    return traverse_util.unflatten_dict({p + (n,): None for p in paths for n in ("a", "b")})
