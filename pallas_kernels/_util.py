"""Small integer helpers and the GPU generation, shared by every op (depends on jax only)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

next_pow2 = pl.next_power_of_2  # smallest power of two >= x (1 for 0)
cdiv = pl.cdiv


def round_up(x: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``x``."""
    return -(-x // m) * m


def pad_to(a, shape):
    """Zero-pads ``a`` at the end of each axis up to ``shape`` (``a`` itself when nothing to pad)."""
    pads = [(0, t - s) for s, t in zip(a.shape, shape)]
    if all(p == (0, 0) for p in pads):
        return a
    return jnp.pad(a, pads)


def is_pow2(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 and (v & (v - 1)) == 0


def gpu_arch(default: int = 90) -> int:
    """Tuning family of the GPU the kernels are lowered for: 80 (Ampere/Ada), 90 (Hopper) or 100 (Blackwell).

    Read from jax's Pallas GPU info (the device's compute capability; tests and
    ``experiments/check_sm90.py`` patch it to lower for a GPU that is not there); ``default`` when there
    is no GPU (interpret mode on CPU).
    """
    try:
        from jax._src.pallas.triton import gpu_info

        cc = gpu_info.get_gpu_info().compute_capability
    except Exception:  # no GPU, a ROCm device, or jax moved the private module
        return default
    if not cc:
        return default
    return 100 if cc >= 100 else 90 if cc >= 90 else 80
