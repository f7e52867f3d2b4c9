"""The one ``nn.Dense`` interceptor: LoRA, quantized kernels, fake quant and activation statistics,
composed per layer without editing the model (``flax.linen.intercept_methods``).

Every part is optional and given as a mapping from module path (``"layers_0/attn/q"``; pick them
with :func:`jaxeff.targets.select`) to that layer's value::

    with intercept_dense(observe={p: lambda x: x for p in paths}, lora=adapters_by_path, lora_scale=2.0) as seen:
        out = model.apply({"params": params}, tokens)
    seen["layers_0/attn/q"]  # that layer's input

Inside the context, a Dense layer named in some part computes, in this order:

1. ``seen[path] = observe[path](x)``: statistics of the layer's input as it arrives (before any
   part changes it);
2. ``xq = act[path](x)``: the input transform (activation fake quant);
3. the product, by the first that applies:
   ``matmul[path](xq, K)`` (e.g. W8A8's ``int8_matmul``) with ``K`` = ``kernel[path]`` or the
   tree's kernel; ``quantized_matmul(xq, K)`` when ``K`` is a ``QuantizedWeight``
   (``kernel[path]``, e.g. QLoRA's frozen NF4 base whose float kernel need not exist, or a
   converted tree's leaf; ``backend`` as given, resolve ``auto`` with
   :func:`jaxeff.targets.resolve_kernel_backend`); otherwise what ``nn.Dense`` computes with the
   float kernel ``weight[path](K)`` (weight fake quant; ``K`` itself without one).
   The quantized products run in ``compute_dtype`` (default: the layer's dtype, else the input's);
4. ``+ bias`` (the layer's, if it has one);
5. ``+ lora_scale · dropout(x) A B`` with ``lora[path] = {"a": [in, r], "b": [r, out]}``, in
   ``compute_dtype``; the adapter reads the layer's input ``x`` as it arrived, not ``xq`` (LoRA and
   QLoRA: a float side path beside the (quantized) base; merging an adapter into a kernel that
   then runs with activation fake quant is therefore not the same function). Dropout (with ``rng``)
   draws its mask from ``fold_in(rng, crc32(path))``;
6. the result in the layer's dtype (else the input's) after a quantized product or a LoRA delta
   (the float product alone keeps ``nn.Dense``'s result dtype).

Dense layers in no part run unchanged, except that a ``QuantizedWeight`` kernel in the tree always
takes step 3's quantized product (so a converted tree runs inside a plain ``intercept_dense()``).
Pass all parts to one context: of two nested ones, a layer that one of them runs never reaches the
other.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Parts = Mapping[str, Any]


def module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def float_dense(x, kernel, module: nn.Dense):
    """What ``nn.Dense`` computes (without the bias) for a float kernel."""
    dtype = module.dtype or jnp.result_type(x, kernel)
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)


@contextlib.contextmanager
def intercept_dense(
    *,
    observe: Parts | None = None,
    act: Parts | None = None,
    weight: Parts | None = None,
    kernel: Parts | None = None,
    matmul: Parts | None = None,
    lora: Parts | None = None,
    lora_scale: float = 1.0,
    dropout: float = 0.0,
    rng=None,
    backend: str = "reference",
    compute_dtype=None,
):
    """Run ``nn.Dense`` layers as the parts say (see the module docstring); yields the dict that
    ``observe`` fills (path -> statistic, the last call's if a layer runs twice)."""
    from pallas_kernels.quant import QuantizedWeight, quantized_matmul  # here: importing Pallas costs ~1 s

    parts = {name: dict(p or {}) for name, p in (("observe", observe), ("act", act), ("weight", weight), ("kernel", kernel), ("matmul", matmul))}
    lora = dict(lora or {})
    named = set(lora).union(*parts.values())
    seen: dict[str, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*args, **kwargs)
        path = module_path(mod)
        k = parts["kernel"].get(path)
        if k is None:
            k = mod.get_variable("params", "kernel")
        if path not in named and not isinstance(k, QuantizedWeight):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        out_dtype = mod.dtype or x.dtype
        cd = compute_dtype or out_dtype
        if path in parts["observe"]:
            seen[path] = parts["observe"][path](x)
        xq = parts["act"][path](x) if path in parts["act"] else x
        float_product = path not in parts["matmul"] and not isinstance(k, QuantizedWeight)
        if path in parts["weight"] and not float_product:
            raise ValueError(f"intercept_dense: '{path}' has a weight transform and a quantized kernel or matmul (weight fake quant needs a float kernel)")
        if path in parts["matmul"]:
            y = parts["matmul"][path](xq.astype(cd), k)
        elif not float_product:
            y = quantized_matmul(xq.astype(cd), k, backend=backend)
        else:
            y = float_dense(xq, parts["weight"][path](k) if path in parts["weight"] else k, mod)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").astype(y.dtype)
        if path in lora:
            xa = x.astype(cd)
            if dropout > 0.0 and rng is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, zlib.crc32(path.encode())), 1.0 - dropout, xa.shape)
                xa = jnp.where(keep, xa / (1.0 - dropout), 0).astype(cd)
            z = jnp.matmul(jnp.matmul(xa, lora[path]["a"].astype(cd)), lora[path]["b"].astype(cd))
            y = y.astype(cd) + (lora_scale * z).astype(cd)
        elif float_product:
            return y
        return y.astype(out_dtype)

    with nn.intercept_methods(interceptor):
        yield seen
