"""Replace what ``nn.Dense`` computes without editing the model (``flax.linen.intercept_methods``).

``run_with_dense(model, params, tokens, dense_fn, **kwargs)`` applies the model; every
``nn.Dense.__call__`` is replaced by ``dense_fn(path, x, kernel, module) -> y [..., out]`` (``path``
like ``"layers_0/attn/q"``; the bias, if any, is added afterwards). Other modules run unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.targets import select


def module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def dense_paths(params, pattern: str, key: str = "quant.weight_layers") -> list[str]:
    """Paths of the Dense modules (dicts holding a ``kernel``) of a parameter tree that the rule
    ``pattern`` selects (:func:`jaxeff.targets.select`: whole-path match)."""
    return select(params, pattern, key)


def get_path(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def set_path(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` set to ``value`` (other nodes shared)."""
    head, _, rest = path.partition("/")
    new = dict(tree)
    new[head] = set_path(tree.get(head, {}), rest, value) if rest else value
    return new


def float_dense(x, kernel, module: nn.Dense):
    """What ``nn.Dense`` computes (without the bias) for a float kernel."""
    dtype = module.dtype or jnp.result_type(x, kernel)
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)


def run_with_dense(model: nn.Module, params, tokens, dense_fn: Callable[..., Any], **kwargs):
    def interceptor(next_fun, args, kw, context):
        mod = context.module
        if not isinstance(mod, nn.Dense) or context.method_name != "__call__":
            return next_fun(*args, **kw)
        x = args[0] if args else kw["inputs"]
        kernel = mod.get_variable("params", "kernel")
        y = dense_fn(module_path(mod), x, kernel, mod)
        if mod.use_bias:
            bias = mod.get_variable("params", "bias")
            y = y + bias.astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, tokens, **kwargs)
