"""QLoRA (Dettmers et al., 2023): LoRA on a frozen base whose adapted kernels are stored as NF4.

The kernels that ``peft.targets`` select are quantized once, when the method is built, with
``pallas_kernels.quantize(w, "nf4", double_quant=True)`` (blocks of 64, absmax constants
double-quantized to int8 in blocks of 256) and kept in the method's ``frozen`` inputs: read-only,
sharded like the kernels, never differentiated (their integer leaves stay out of ``jax.grad``) and
never checkpointed (a resumed run re-quantizes the same base, bit for bit). The trained tree is
``{"model": the rest of the model (embeddings, norms, biases; frozen, float), "lora": adapters}``.
Adapters are bf16 and the adapted layers compute in ``peft.compute_dtype`` (bf16); the base
matmul is ``pallas_kernels.quantized_matmul`` (``peft.kernel_backend``; ``auto`` is the Pallas
kernel on GPU/TPU and the jnp dequantize-then-matmul reference on CPU, where Pallas runs in slow
interpret mode). Gradients reach only the adapters.

The base the kernels come from is ``train.init_from`` (or, without it, the seeded random
initialisation the trainer would use): the context's ``base_params()``, which the trainer also
initialises the run from, so the checkpoint is read once. Reading a saved qlora run needs the base
too (the NF4 kernels are not saved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jaxeff.peft.config import PeftConfig
from jaxeff.peft.lora import (
    _DTYPES,
    _flatten_until,
    _get,
    _mask,
    _placeholder,
    adapter_axes,
    adapter_dtype,
    init_adapters,
    initial_adapters,
    lora_interceptor,
    lora_scale,
    merge,
    target_paths,
    with_initial,
)
from jaxeff.targets import resolve_kernel_backend
from jaxeff.train.methods import Method, MethodContext, lm_forward_loss, register_method


def quantize_base(params, paths, double_quant: bool = True):
    """``{path: QuantizedWeight}`` (nested by module path) of the NF4 kernels at ``paths``."""
    from pallas_kernels.quant import quantize

    flat = {p: quantize(_get(params, p)["kernel"].astype(jnp.float32), "nf4", double_quant=double_quant) for p in paths}
    return _nest(flat)


def _nest(flat: dict):
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def strip_kernels(params, paths):
    """``params`` without the ``kernel`` of the modules at ``paths`` (empty modules dropped)."""
    drop = {p + ("kernel",) for p in paths}
    flat = {k: v for k, v in traverse_util.flatten_dict(params).items() if k not in drop}
    return traverse_util.unflatten_dict(flat)


def dequantize_base(params, qbase, dtype=jnp.float32):
    """Full model parameters: ``params`` (kernels stripped) plus the dequantized kernels."""
    from pallas_kernels.quant import dequantize

    flat = traverse_util.flatten_dict(params)
    for path, qw in _flatten_until(qbase, _qw_type()).items():
        flat[path + ("kernel",)] = dequantize(qw, dtype)
    return traverse_util.unflatten_dict(flat)


def qbase_axes(model_axes, qbase):
    """Logical axes of the quantized kernels: packed data and block constants follow the kernel's
    [in, out] axes (a dimension the mesh does not divide is replicated)."""
    QW = _qw_type()
    flat = {}
    for path, qw in _flatten_until(qbase, QW).items():
        a_in, a_out = tuple(_get(model_axes, path)["kernel"])
        flat[path] = QW(
            data=P(a_in, a_out),
            scales=P(a_in, a_out),
            zeros=None if qw.zeros is None else P(a_in, a_out),
            dq_scales=None if qw.dq_scales is None else P(a_in, None),
            dq_mean=None if qw.dq_mean is None else P(),
            fmt=qw.fmt,
            shape=qw.shape,
            group_size=qw.group_size,
            symmetric=qw.symmetric,
            double_quant=qw.double_quant,
        )
    return _nest(flat)


def qbase_stats(qbase) -> dict[str, float]:
    """Bytes and parameter count of the quantized kernels, and bytes per parameter."""
    qws = list(_flatten_until(qbase, _qw_type()).values())
    nbytes = sum(q.nbytes for q in qws)
    n = sum(q.num_params for q in qws)
    return {"bytes": nbytes, "params": n, "bytes_per_param": nbytes / max(n, 1)}


def _qw_type():
    from pallas_kernels.quant import QuantizedWeight

    return QuantizedWeight


@register_method("qlora", config=PeftConfig, section="peft")
def qlora_method(ctx: MethodContext) -> Method:
    """LoRA adapters (bf16) on an NF4 base; only the adapters train."""
    cfg, model = ctx.cfg, ctx.model
    p = cfg.peft
    scale = lora_scale(p)
    like = ctx.abstract_params
    paths = target_paths(like, p.targets)
    dtype = adapter_dtype(p, "bfloat16")
    initial = initial_adapters(cfg, like, paths)
    compute = _DTYPES[p.compute_dtype]
    backend = resolve_kernel_backend(p.kernel_backend)
    qbase = quantize_base(ctx.base_params(), paths, p.double_quant)
    qbase_const = jax.tree.map(np.asarray, qbase)  # for eval / generate, which get no frozen inputs

    def prepare_params(base, rng):
        return {"model": strip_kernels(base, paths), "lora": with_initial(init_adapters(base, paths, p.rank, rng, dtype), initial, dtype)}

    def loss(params, batch, rng, *, frozen, deterministic):
        drop = 0.0 if deterministic else p.dropout
        with lora_interceptor(
            params["lora"], scale, dropout=drop, rng=jax.random.fold_in(rng, 1), qbase=frozen["qbase"], backend=backend, compute_dtype=compute
        ):
            value, _ = lm_forward_loss(model, params["model"], batch, rng, deterministic)
        return value, {}

    def apply(model_, params, tokens, **kwargs):
        with lora_interceptor(params["lora"], scale, qbase=qbase_const, backend=backend, compute_dtype=compute):
            return model_.apply({"params": params["model"]}, tokens, **kwargs)

    def model_params(params):
        return merge(dequantize_base(params["model"], qbase_const), params["lora"], scale)

    def logical_axes(axes):
        return {"model": strip_kernels(axes, paths), "lora": adapter_axes(axes, _placeholder(paths))}

    return Method(
        "qlora",
        loss,
        trainable=lambda params: {"model": _mask(params["model"], False), "lora": _mask(params["lora"], True)},
        prepare_params=prepare_params,
        logical_axes=logical_axes,
        model_params=model_params,
        apply=apply,
        frozen={"qbase": qbase},
        frozen_logical_axes={"qbase": qbase_axes(ctx.model_axes, qbase)},
    )
