"""Quantization-aware training: method ``qat``.

The model runs with fake-quantized Dense kernels (``quant.weight`` on the layers matching
``quant.weight_layers``) and fake-quantized Dense inputs (``quant.activation`` on
``quant.activation_layers``, scales from the current values: dynamic), with STE gradients; the
float weights are what the optimizer updates. With ``quant.weight.learnable_scale`` the prepared
parameter tree is ``{"model": <model params>, "qscales": {<path>: scale}}`` (LSQ scales, initialised
to the absmax / min-max scales of the starting weights); otherwise it is the plain model tree, so
``train.init_from`` a float run and evaluating a float checkpoint with ``method=qat``
(post-training fake quantization, dynamic activations) both work unchanged.

``model_params(params)`` returns the model with its kernels replaced by their quantize-dequantize
values: the weights a converted model (``jaxeff.quant.convert``) stores.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from jaxeff.quant.config import QuantConfig
from jaxeff.quant.fake_quant import fake_quant
from jaxeff.dense import intercept_dense
from jaxeff.quant.intercept import dense_paths, get_path, set_path
from jaxeff.quant.quantizers import QuantSpec, compute_scale_zero, scale_and_zero_from_range
from jaxeff.train.losses import cross_entropy
from jaxeff.train.methods import Method, MethodContext, forward_kwargs, register_method


def _weight_spec(qcfg) -> QuantSpec | None:
    return qcfg.weight.spec() if qcfg.weight is not None else None


def _act_spec(qcfg) -> QuantSpec | None:
    return qcfg.activation.spec() if qcfg.activation is not None else None


def fake_quant_weight(kernel, spec: QuantSpec, scale=None, learned=False):
    """A ``[K, N]`` kernel fake-quantized along K (per output column / group / tensor)."""
    return fake_quant(kernel, spec, axis=-2, scale=scale, learned=learned)


def fake_quant_activation(x, spec: QuantSpec, act_range=None):
    """Dense inputs ``[..., K]``: dynamic scales (per token for ``channel``) or, with ``act_range =
    (lo, hi)`` from calibration, one static per-tensor scale (values outside are clipped)."""
    if act_range is None:
        return fake_quant(x, spec, axis=-1)
    tensor_spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric, granularity="tensor")
    scale, zero = scale_and_zero_from_range(act_range[0], act_range[1], tensor_spec)
    return fake_quant(x, tensor_spec, axis=-1, scale=scale.reshape((1,) * x.ndim), zero=zero.reshape((1,) * x.ndim))


def fake_quant_parts(params, qcfg, *, qscales=None, act_ranges=None) -> dict[str, dict]:
    """The ``act`` and ``weight`` parts of :func:`jaxeff.dense.intercept_dense` that ``qcfg`` (a
    QuantConfig) says: ``qscales``, learned weight scales by path; ``act_ranges``, static activation
    ranges by path (PTQ calibration); layers missing from ``act_ranges`` use dynamic scales."""
    wspec, aspec = _weight_spec(qcfg), _act_spec(qcfg)
    wsel = dense_paths(params, qcfg.weight_layers) if wspec is not None else []
    asel = dense_paths(params, qcfg.activation_layers, "quant.activation_layers") if aspec is not None else []
    ranges, scales = act_ranges or {}, qscales or {}
    act = {p: functools.partial(fake_quant_activation, spec=aspec, act_range=ranges.get(p)) for p in asel}
    weight = {p: functools.partial(fake_quant_weight, spec=wspec, scale=scales.get(p), learned=p in scales) for p in wsel}
    return {"act": act, "weight": weight}


def fake_quant_apply(model, params, tokens, qcfg, *, qscales=None, act_ranges=None, **kwargs):
    """Run ``model`` with fake-quantized Dense layers as ``qcfg`` says (see :func:`fake_quant_parts`)."""
    with intercept_dense(**fake_quant_parts(params, qcfg, qscales=qscales, act_ranges=act_ranges)):
        return model.apply({"params": params}, tokens, **kwargs)


def _flat_scales(tree, paths):
    return {p: get_path(tree, p) for p in paths}


def init_weight_scales(params, qcfg) -> dict:
    """Nested dict path -> the absmax (or min-max) scale of each quantized kernel (grouped layout)."""
    out: dict = {}
    for path in dense_paths(params, qcfg.weight_layers):
        scale, _ = compute_scale_zero(get_path(params, path)["kernel"], _weight_spec(qcfg), axis=-2)
        out = set_path(out, path, scale)
    return out


def quantized_model_params(params, qcfg, qscales=None) -> dict:
    """The model tree with each selected kernel replaced by its quantize-dequantize value."""
    wspec = _weight_spec(qcfg)
    if wspec is None:
        return params
    for path in dense_paths(params, qcfg.weight_layers):
        node = get_path(params, path)
        scale = None if qscales is None else qscales.get(path)
        params = set_path(params, path, {**node, "kernel": fake_quant_weight(node["kernel"], wspec, scale)})
    return params


@register_method("qat", config=QuantConfig, section="quant")
def qat_method(ctx: MethodContext) -> Method:
    """Quantization-aware training as the ``quant`` section says (see the module docstring)."""
    cfg, model = ctx.cfg, ctx.model
    qcfg = cfg.quant
    learn = qcfg.weight is not None and qcfg.weight.learnable_scale

    def split(params):
        if not learn:
            return params, None
        paths = dense_paths(params["model"], qcfg.weight_layers)
        return params["model"], _flat_scales(params["qscales"], paths)

    def apply(model_, params, tokens, **kwargs):
        mp, scales = split(params)
        return fake_quant_apply(model_, mp, tokens, qcfg, qscales=scales, **kwargs)

    def loss(params, batch, rng, *, frozen, deterministic):
        out = apply(model, params, batch["inputs"], **forward_kwargs(batch, rng, deterministic))
        value, _ = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return value, {}

    def prepare_params(params, rng):
        if not learn:
            return params
        return {"model": params, "qscales": init_weight_scales(params, qcfg)}

    def model_params(params):
        mp, scales = split(params)
        return quantized_model_params(mp, qcfg, scales)

    def logical_axes(model_axes):  # the learned scales are small: replicated
        if not learn:
            return model_axes
        scales = jax.eval_shape(lambda p: init_weight_scales(p, qcfg), ctx.abstract_params)
        return {"model": model_axes, "qscales": jax.tree.map(lambda _: P(), scales)}

    return Method("qat", loss, prepare_params=prepare_params, logical_axes=logical_axes, model_params=model_params, apply=apply)
