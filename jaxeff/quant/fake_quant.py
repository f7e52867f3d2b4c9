"""Fake quantization for training: the forward pass is quantize-then-dequantize, the backward pass
is the straight-through estimator (STE).

Gradient rules (``v = x / scale``):

* wrt ``x``: 1 where ``round(v) + zero`` lies inside ``[qmin, qmax]``, 0 where the value is
  clipped. With scales computed from the values themselves (absmax / min-max) nothing clips, so
  the gradient is the identity; with fixed (calibrated) or learned scales it is zero outside the
  representable range ``[(qmin - zero)·scale, (qmax - zero)·scale]``. Ternary weights follow
  BitNet b1.58's reference code instead: the identity everywhere (its absmean scale clips about a
  fifth of a Gaussian weight's entries, which would otherwise never receive a gradient).
* wrt a learned ``scale`` (LSQ, Esser et al. 2020): ``round(v) - v`` inside the range, ``qmin - zero``
  or ``qmax - zero`` where clipped, times LSQ's gradient scale ``1 / sqrt(n · qmax)`` (``n`` values
  share the scale). Scales computed from the values are constants (no gradient).

Usage::

    w_hat = fake_quant(w, QuantSpec(bits=4, granularity="group", group_size=64), axis=-2)
    x_hat = fake_quant(x, QuantSpec(bits=8, granularity="channel"), axis=-1)    # per token
    w_hat = fake_quant(w, spec, axis=-2, scale=learned_scale)                    # LSQ
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxeff.quant.quantizers import QuantSpec, compute_scale_zero, grouped, round_ste, scale_gradient


def _clip_inclusive(v, lo, hi):
    """clip whose gradient is 1 on the closed range [lo, hi] (jnp.clip halves it at the ends)."""
    return jnp.where(v < lo, lo, jnp.where(v > hi, hi, v))


def fake_quant(x, spec: QuantSpec, *, axis: int = -1, scale=None, zero=None, learned: bool = False):
    """Quantize-dequantize ``x`` with STE gradients. ``scale``/``zero`` (grouped layout, see
    ``quantizers.grouped``) fix the grid; without them they are computed from ``x`` (no gradient).
    ``learned=True`` marks ``scale`` as a trained parameter (LSQ gradient scale)."""
    x = jnp.asarray(x)
    xf = x.astype(jnp.float32)
    if scale is None:
        scale, zero = compute_scale_zero(jax.lax.stop_gradient(xf), spec, axis)
    if zero is None:
        zero = jnp.zeros_like(scale)
    xg, red = grouped(xf, spec, axis)
    if learned:
        n = math.prod(xg.shape[a] for a in red)
        scale = scale_gradient(jnp.abs(scale) + 1e-12, 1.0 / math.sqrt(n * max(spec.qmax, 1)))
    zero = jax.lax.stop_gradient(zero)
    if spec.ternary and not learned:  # BitNet b1.58's rule: identity gradient, clipped weights included
        out = (jnp.clip(jnp.round(xg / scale), -1, 1) * scale).reshape(x.shape)
        return (xf + jax.lax.stop_gradient(out - xf)).astype(x.dtype)
    q = _clip_inclusive(round_ste(xg / scale) + zero, spec.qmin, spec.qmax)
    out = (q - zero) * scale
    return out.reshape(x.shape).astype(x.dtype)
