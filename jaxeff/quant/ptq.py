"""Post-training quantization of a float model (no training).

* Weights: quantize-dequantize as ``quant.weight`` says (``qat.quantized_model_params``), or the real
  kernel formats through ``jaxeff.quant.convert``.
* Activations, dynamic: scales from each Dense input at run time (per token for ``channel``,
  one per call for ``tensor``): ``ptq_apply(..., act_ranges=None)``.
* Activations, static: one range ``(lo, hi)`` per Dense input, fixed by :func:`calibrate` over
  ``quant.calibration.batches`` batches, then one per-tensor scale (values outside are clipped):

  - ``minmax``: ``lo = min``, ``hi = max`` of all the layer's input values over all calibration batches;
  - ``percentile`` p: ``lo = percentile(values, 100 - p)``, ``hi = percentile(values, p)`` over all
    those values (numpy's linear interpolation), which ignores rare outliers.

Usage::

    ranges = calibrate(model, params, [batch["inputs"] for batch in batches], cfg.quant)
    out = ptq_apply(model, params, tokens, cfg.quant, act_ranges=ranges)
"""

from __future__ import annotations


import jax
import numpy as np

from jaxeff.dense import intercept_dense
from jaxeff.targets import select
from jaxeff.quant.qat import fake_quant_apply, quantized_model_params


def collect_dense_inputs(model, params, tokens, pattern, key: str = "quant.activation_layers") -> dict[str, jax.Array]:
    """The input ``x`` of every Dense a rule selects (:func:`jaxeff.targets.select`; ``pattern`` one
    rule or several), for one batch of tokens."""
    chosen = select(params, pattern, key)

    @jax.jit
    def run(params, tokens):
        with intercept_dense(observe={p: lambda x: x for p in chosen}) as seen:
            model.apply({"params": params}, tokens)
        return seen

    return run(params, tokens)


def calibrate(model, params, token_batches, qcfg) -> dict[str, tuple[float, float]]:
    """Static activation ranges ``{path: (lo, hi)}`` for the layers of ``qcfg.activation_layers``
    from ``token_batches`` (an iterable of ``[batch, seq]`` token arrays; the float model runs)."""
    cal = qcfg.calibration
    values: dict[str, list[np.ndarray]] = {}
    for i, tokens in enumerate(token_batches):
        if i >= cal.batches:
            break
        for path, x in collect_dense_inputs(model, params, tokens, qcfg.activation_layers).items():
            values.setdefault(path, []).append(np.asarray(x, np.float32).ravel())
    if not values:
        raise ValueError("calibrate: no calibration batches, or no Dense layer matches quant.activation_layers")
    out = {}
    for path, vs in values.items():
        v = np.concatenate(vs)
        if cal.method == "minmax":
            out[path] = (float(v.min()), float(v.max()))
        else:
            out[path] = (float(np.percentile(v, 100.0 - cal.percentile)), float(np.percentile(v, cal.percentile)))
    return out


def ptq_apply(model, params, tokens, qcfg, *, act_ranges=None, **kwargs):
    """The float model run with PTQ fake quantization (weights and, if configured, activations:
    static with ``act_ranges``, else dynamic)."""
    return fake_quant_apply(model, params, tokens, qcfg, act_ranges=act_ranges, **kwargs)


__all__ = ["calibrate", "collect_dense_inputs", "ptq_apply", "quantized_model_params"]
