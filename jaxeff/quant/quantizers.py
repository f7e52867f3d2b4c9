"""Uniform integer quantizers and ternary weights, as pure functions.

Definitions (``b`` bits, ``x`` the values sharing one scale):

* symmetric (absmax): ``qmax = 2**(b-1) - 1``, codes in ``[-qmax, qmax]`` (the restricted range,
  e.g. [-127, 127] for 8 bits, [-7, 7] for 4 bits, [-1, 1] for 2 bits — the same grid as the
  int8/int4 kernels), ``scale = max|x| / qmax``, ``zero = 0``.
* asymmetric (zero point): codes in ``[0, 2**b - 1]``; the range is widened to include 0
  (``lo = min(min x, 0)``, ``hi = max(max x, 0)``) so that 0 is exact; ``scale = (hi - lo) / (2**b - 1)``,
  ``zero = clip(round(-lo / scale), 0, 2**b - 1)`` (an integer).
* ternary (BitNet b1.58): ``scale = mean|x|`` (absmean), codes ``clip(round(x / scale), -1, 1)``.

``q = clip(round(x / scale) + zero, qmin, qmax)`` and ``x_hat = (q - zero) * scale``. Rounding is
round-half-to-even (``jnp.round``). A scale of 0 (all-zero values) is replaced by 1.

Granularity says which values share a scale. ``axis`` is the reduction axis: the contraction
axis ``K`` of a weight ``[K, N]`` (``axis=-2``) or the feature axis of activations ``[..., K]``
(``axis=-1``).

* ``tensor``: one scale for the whole array.
* ``channel``: one scale per slice along ``axis`` (per output column of a weight, per token of
  activations).
* ``group``: as ``channel`` but ``axis`` is cut into groups of ``group_size`` consecutive entries.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Granularity = Literal["tensor", "channel", "group"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (hashable: usable as a static argument)."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = 64
    ternary: bool = False

    def __post_init__(self):
        if not self.ternary and not 2 <= self.bits <= 8:
            raise ValueError(f"bits: expected 2..8 (got {self.bits})")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity: expected tensor, channel or group (got {self.granularity!r})")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"group_size: expected a positive size (got {self.group_size})")

    @property
    def qmin(self) -> int:
        if self.ternary:
            return -1
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.ternary:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def has_zero_point(self) -> bool:
        return not self.symmetric and not self.ternary


def _axis(x, axis: int) -> int:
    return axis % x.ndim


def grouped(x, spec: QuantSpec, axis: int):
    """``x`` with ``axis`` split into ``[groups, group_size]`` for group granularity (else ``x``);
    returns (array, reduction axes for one scale)."""
    a = _axis(x, axis)
    if spec.granularity == "tensor":
        return x, tuple(range(x.ndim))
    if spec.granularity == "channel":
        return x, (a,)
    n, g = x.shape[a], spec.group_size
    if n % g:
        raise ValueError(f"group_size: {g} does not divide the quantized axis of size {n} (shape {tuple(x.shape)})")
    return x.reshape(x.shape[:a] + (n // g, g) + x.shape[a + 1 :]), (a + 1,)


def _safe(s):
    return jnp.where(s > 0, s, 1.0)


def scale_and_zero_from_range(lo, hi, spec: QuantSpec):
    """``(scale, zero)`` for values known to lie in ``[lo, hi]`` (arrays broadcast together)."""
    if spec.ternary:
        raise ValueError("ternary scales come from mean |x| (absmean), not from a range")
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    if spec.symmetric:
        scale = _safe(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / spec.qmax)
        return scale, jnp.zeros_like(scale)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = _safe((hi - lo) / spec.qmax)
    zero = jnp.clip(jnp.round(-lo / scale), 0, spec.qmax)
    return scale, zero


def compute_scale_zero(x, spec: QuantSpec, axis: int = -2):
    """Scale and zero point of ``x`` (in the grouped layout of :func:`grouped`, keepdims)."""
    xg, red = grouped(jnp.asarray(x, jnp.float32), spec, axis)
    if spec.ternary:
        scale = _safe(jnp.mean(jnp.abs(xg), axis=red, keepdims=True))
        return scale, jnp.zeros_like(scale)
    return scale_and_zero_from_range(jnp.min(xg, axis=red, keepdims=True), jnp.max(xg, axis=red, keepdims=True), spec)


def quantize_codes(xg, scale, zero, spec: QuantSpec):
    """Integer codes (as float32) of grouped values: ``clip(round(x / scale) + zero, qmin, qmax)``."""
    return jnp.clip(jnp.round(xg / scale) + zero, spec.qmin, spec.qmax)


def dequantize_codes(q, scale, zero):
    return (q - zero) * scale


def quantize_dequantize(x, spec: QuantSpec, axis: int = -2, scale=None, zero=None):
    """``x_hat``: quantize then dequantize (no gradient rules; see ``fake_quant`` for training)."""
    x = jnp.asarray(x)
    if scale is None:
        scale, zero = compute_scale_zero(x, spec, axis)
    xg, _ = grouped(x.astype(jnp.float32), spec, axis)
    out = dequantize_codes(quantize_codes(xg, scale, zero, spec), scale, zero)
    return out.reshape(x.shape).astype(x.dtype)


def round_ste(v):
    """``round(v)`` forward, identity gradient (straight-through estimator)."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def scale_gradient(s, factor):
    """``s`` forward; its gradient multiplied by ``factor`` (LSQ's gradient scale)."""
    return s * factor + jax.lax.stop_gradient(s - s * factor)
