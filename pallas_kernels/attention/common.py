"""Argument checking and small helpers shared by the attention backends."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from pallas_kernels._util import is_pow2, next_pow2

KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
LOG2E = math.log2(math.e)


_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and compiler parameters of the attention kernels; None = the backend's default.

    ``block_q``/``block_k`` tile the forward pass, ``*_dkv`` the dK/dV backward kernel (one program
    per KV block, looping over query blocks), ``*_dq`` the dQ backward kernel (one program per query
    block, looping over KV blocks); all powers of two >= 16, clipped to the (padded) sequence length.
    ``num_warps``/``num_stages`` are the Triton parameters of the forward kernel, ``*_bwd`` those of
    both backward kernels and ``*_dq`` of the dQ kernel alone (default: ``*_bwd``). Each backend
    fills the fields left None from its own table: ``triton_config.gpu_block_sizes`` (per GPU
    generation and head_dim) and ``mosaic_tpu.TPU_DEFAULT_BLOCKS``.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None

    @classmethod
    def from_arg(cls, block_sizes) -> "BlockSizes":
        if block_sizes is None:
            return cls()
        if isinstance(block_sizes, cls):
            bs = block_sizes
        elif isinstance(block_sizes, dict):
            try:
                bs = cls(**block_sizes)
            except TypeError as e:
                raise ValueError(f"block_sizes: {e}; valid keys are {[f.name for f in dataclasses.fields(cls)]}") from None
        elif isinstance(block_sizes, (tuple, list)) and len(block_sizes) == 2:
            bq, bk = block_sizes
            bs = cls(block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk, block_q_dq=bq, block_k_dq=bk)
        else:
            raise ValueError(f"block_sizes: got {block_sizes!r}, expected None, a BlockSizes, a dict of its fields or a (block_q, block_k) pair")
        for f in _BLOCK_FIELDS:
            val = getattr(bs, f)
            if val is not None and (not is_pow2(val) or val < 16):
                raise ValueError(f"block_sizes.{f}: got {val!r}, expected a power of two >= 16")
        for f in ("num_warps", "num_warps_bwd", "num_warps_dq"):
            val = getattr(bs, f)
            if val is not None and not is_pow2(val):
                raise ValueError(f"block_sizes.{f}: got {val!r}, expected a power of two (warps per program)")
        for f in ("num_stages", "num_stages_bwd", "num_stages_dq"):
            val = getattr(bs, f)
            if val is not None and not (isinstance(val, (int, np.integer)) and val >= 1):
                raise ValueError(f"block_sizes.{f}: got {val!r}, expected an int >= 1")
        return bs

    def with_defaults(self, defaults: "BlockSizes") -> "BlockSizes":
        """The fields left None taken from ``defaults`` (``*_dq`` falls back to a given ``*_bwd``)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        for dq, bwd in (("num_warps_dq", "num_warps_bwd"), ("num_stages_dq", "num_stages_bwd")):
            if dq not in given and bwd in given:
                given[dq] = given[bwd]
        return dataclasses.replace(defaults, **given)


def clip_block(block: int, length: int) -> int:
    """Largest useful block for ``length``: min(block, next_pow2(length)), at least 16."""
    return max(16, min(block, next_pow2(length)))


def default_scale(q, scale):
    return float(1.0 / math.sqrt(q.shape[-1])) if scale is None else float(scale)


def normalize_window(local_window_size):
    """int w -> (w, w) (as jax.nn.dot_product_attention); validates; None stays None."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        lws = (int(local_window_size), int(local_window_size))
    elif (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in local_window_size)
    ):
        lws = (int(local_window_size[0]), int(local_window_size[1]))
    else:
        raise ValueError(f"local_window_size: got {local_window_size!r}, expected None, an int or a (left, right) pair of ints")
    if lws[0] < 0 or lws[1] < 0:
        raise ValueError(f"local_window_size: got {local_window_size!r}, expected non-negative sizes")
    return lws


def window_bounds(causal: bool, local_window_size):
    """(left, right) reach of a query, None meaning unbounded. causal forces right = 0."""
    lws = normalize_window(local_window_size)
    left, right = (None, None) if lws is None else lws
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _shape_err(name, arr, expected):
    return ValueError(f"{name}: got shape {tuple(arr.shape)}, expected {expected}")


def check_attention_args(q, k, v, local_window_size, q_segment_ids, kv_segment_ids):
    if q.ndim != 4:
        raise _shape_err("q", q, "[batch, q_len, heads, head_dim]")
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise _shape_err("k", k, f"[batch={b}, kv_len, kv_heads, head_dim={d}]")
    if v.shape != k.shape:
        raise _shape_err("v", v, f"the shape of k {tuple(k.shape)}")
    s, kvh = k.shape[1], k.shape[2]
    if t == 0 or s == 0 or d == 0:
        raise _shape_err("q", q, f"non-empty q_len, kv_len, head_dim (k is {tuple(k.shape)})")
    if kvh == 0 or h % kvh:
        raise _shape_err("k", k, f"kv_heads dividing heads={h}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}: got dtype {a.dtype}, expected a floating dtype")
    normalize_window(local_window_size)
    for name, seg, n in (("q_segment_ids", q_segment_ids, t), ("kv_segment_ids", kv_segment_ids, s)):
        if seg is None:
            continue
        if seg.ndim != 2 or seg.shape != (b, n):
            raise _shape_err(name, seg, f"[batch={b}, {n}]")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"{name}: got dtype {seg.dtype}, expected an integer dtype")
    if (q_segment_ids is None) != (kv_segment_ids is None) and t != s:
        given = "q_segment_ids" if kv_segment_ids is None else "kv_segment_ids"
        raise ValueError(f"{given}: only one segment-id array given with q_len={t} != kv_len={s}; expected both q_segment_ids and kv_segment_ids")


def check_decode_args(q, k_cache, v_cache, kv_len):
    if q.ndim != 4:
        raise _shape_err("q", q, "[batch, q_len (1..16), heads, head_dim]")
    b, t, h, d = q.shape
    if not 1 <= t <= 16:
        raise _shape_err("q", q, "q_len between 1 and 16 (use flash_attention for longer queries)")
    if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise _shape_err("k_cache", k_cache, f"[batch={b}, cache_len, kv_heads, head_dim={d}]")
    if v_cache.shape != k_cache.shape:
        raise _shape_err("v_cache", v_cache, f"the shape of k_cache {tuple(k_cache.shape)}")
    kvh = k_cache.shape[2]
    if kvh == 0 or h % kvh:
        raise _shape_err("k_cache", k_cache, f"kv_heads dividing heads={h}")
    if k_cache.shape[1] < t:
        raise _shape_err("k_cache", k_cache, f"cache_len >= q_len={t}")
    if kv_len is not None:
        kv_len = jnp.asarray(kv_len)
        if kv_len.shape != (b,) or not jnp.issubdtype(kv_len.dtype, jnp.integer):
            raise ValueError(f"kv_len: got shape {tuple(kv_len.shape)} dtype {kv_len.dtype}, expected an int array of shape [batch={b}]")


def _block_min_max(seg, block):
    b, n = seg.shape
    s = seg.reshape(b, n // block, block)
    return s.min(-1), s.max(-1)


def segment_block_ranges(own_seg, other_seg, own_block, other_block):
    """For each own block, the [lo, hi) range of other blocks whose [min, max] segment ids overlap.

    Always correct (a superset of the blocks holding visible pairs); tight for packed (sorted)
    segments, where it makes packed-sequence attention cost ~ sum of per-segment costs.
    """
    amin, amax = _block_min_max(own_seg, own_block)
    bmin, bmax = _block_min_max(other_seg, other_block)
    overlap = (bmax[:, None, :] >= amin[:, :, None]) & (bmin[:, None, :] <= amax[:, :, None])
    nb = overlap.shape[-1]
    anyv = overlap.any(-1)
    lo = jnp.argmax(overlap, axis=-1)
    hi = nb - jnp.argmax(overlap[..., ::-1], axis=-1)
    return (jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, 0).astype(jnp.int32))
