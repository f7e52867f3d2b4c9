"""Attention dispatch: one function, several implementations (``xla | cudnn | pallas | auto``).

Shapes: q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len, kv_heads, head_dim]`` with
``heads % kv_heads == 0`` (GQA/MQA). Query i sits at absolute index ``q_offset + i`` of the key
sequence; masks combine causality, an optional sliding window (``window`` visible tokens including
the current one), segment ids (packed documents) and the number of valid keys (KV cache). An
explicit boolean ``mask`` ``[q_len, kv_len]`` or ``[batch, q_len, kv_len]`` (True = visible) is
ANDed with all of these; it serves tree attention (Medusa's candidate tree verified in one pass,
:mod:`jaxeff.decode.medusa`) and runs on the XLA path whatever ``impl`` says.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "xla", "cudnn", "pallas")


def _mask(q_len, kv_len, *, q_offset, causal, window, q_segment_ids, kv_segment_ids, kv_valid, mask=None):
    """Boolean mask broadcastable to ``[batch, 1, 1, q_len, kv_len]`` (True = visible)."""
    explicit = mask
    q_idx = q_offset + jnp.arange(q_len)[:, None]
    k_idx = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    if causal:
        mask &= k_idx <= q_idx
    if window is not None:
        mask &= k_idx > q_idx - window
        if not causal:
            mask &= k_idx < q_idx + window
    mask = mask[None, None, None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & seg[:, None, None]
    if kv_valid is not None:
        mask = mask & (k_idx < kv_valid)[None, None, None]
    if explicit is not None:
        explicit = explicit if explicit.ndim == 3 else explicit[None]
        mask = mask & explicit[:, None, None]
    return mask


BANDED_MIN_RATIO = 4  # banded sliding-window attention once the sequence is this many windows long


def xla_attention(q, k, v, *, causal=True, window=None, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_valid=None, scale=None, mask=None):
    """Reference-quality attention in plain jnp (softmax in float32). Rows with no visible key
    return zeros. K/V heads are shared across query groups by reshaping, not by repeating.

    Causal sliding-window self-attention over a sequence at least ``BANDED_MIN_RATIO`` windows
    long runs banded (:func:`banded_window_attention`): O(seq · window) work and memory instead of
    O(seq²), so its cost per token stays flat as the context grows."""
    if (
        causal
        and window is not None
        and kv_valid is None
        and q_offset == 0
        and q.shape[1] == k.shape[1]
        and q.shape[1] >= BANDED_MIN_RATIO * window
        and mask is None
    ):
        return banded_window_attention(q, k, v, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
    return _dense_attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
        kv_valid=kv_valid,
        scale=scale,
        mask=mask,
    )


def banded_window_attention(q, k, v, *, window, q_segment_ids=None, kv_segment_ids=None, scale=None):
    """Causal sliding-window self-attention in blocks of ``window`` queries: block i attends to key
    blocks i-1 and i only (every key a query may see, since it sees at most ``window`` tokens), so
    the scores are ``[.., seq/window, window, 2·window]`` instead of ``[.., seq, seq]``. Same
    arguments and results as the dense path (q and k/v of one sequence, no cache)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    c = window
    n = -(-t // c)
    pad = n * c - t
    scale = d**-0.5 if scale is None else scale

    def blocks(x, fill=0):  # [b, t, ...] -> [b, n, c, ...], padded at the end
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, n, c, *x.shape[2:])

    def with_previous(x):  # [b, n, c, ...] -> [b, n, 2c, ...]: block i-1 (zeros before block 0), block i
        prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([prev, x], axis=2)

    qb = blocks(q).reshape(b, n, c, kvh, g, d)
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))  # [b, n, 2c, kvh, d]
    logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    q_idx = jnp.arange(n)[:, None, None] * c + jnp.arange(c)[None, :, None]  # [n, c, 1]
    k_idx = (jnp.arange(n)[:, None, None] - 1) * c + jnp.arange(2 * c)[None, None, :]  # [n, 1, 2c]
    mask = (k_idx <= q_idx) & (k_idx > q_idx - window) & (k_idx >= 0)  # [n, c, 2c]
    mask = mask[None, :, None, None]  # [1, n, 1, 1, c, 2c]
    if q_segment_ids is not None:
        qs = blocks(q_segment_ids, -1)  # [b, n, c]
        ks = with_previous(blocks(kv_segment_ids, -2))  # [b, n, 2c]
        mask = mask & (qs[:, :, :, None] == ks[:, :, None, :])[:, :, None, None]
    logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    return out.reshape(b, n * c, h, d)[:, :t].astype(q.dtype)


def _dense_attention(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, kv_valid, scale, mask=None):
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kvh, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = _mask(
        t, s, q_offset=q_offset, causal=causal, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_valid=kv_valid, mask=mask
    )
    logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _cudnn_attention(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, kv_valid, scale):
    if q.shape[1] != k.shape[1]:
        raise ValueError("attention impl 'cudnn' supports full-sequence attention only; decoding uses 'xla'")
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    lws = None if window is None else (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, local_window_size=lws, implementation="cudnn")


@functools.cache
def _pallas():
    try:
        import pallas_kernels.attention as pk
    except ImportError as e:  # pragma: no cover - the kernel package ships with jaxeff
        raise ValueError(f"attention impl 'pallas' is unavailable: {e}") from None
    return pk


def _pallas_attention(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, kv_valid, scale):
    pk = _pallas()
    lws = None if window is None else (window - 1, 0 if causal else window - 1)
    if kv_valid is not None:  # decoding against a KV cache
        kv_len = jnp.broadcast_to(jnp.asarray(kv_valid, jnp.int32), (q.shape[0],))
        return pk.flash_decode(q, k, v, kv_len=kv_len, scale=scale, local_window_size=lws)
    if q_offset != 0 and q_offset != k.shape[1] - q.shape[1]:
        raise ValueError("attention impl 'pallas': queries must be the last q_len positions")

    def kernel(q, k, v, qs, ks):
        return pk.flash_attention(q, k, v, causal=causal, local_window_size=lws, q_segment_ids=qs, kv_segment_ids=ks, scale=scale)

    return _per_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)


def _per_shard(kernel, q, k, v, q_seg, kv_seg):
    """Run a kernel that XLA cannot partition once per device under the ambient mesh (the trainer
    sets one): batch rows split over the 'data'/'fsdp' axes, heads over 'tensor' when both the
    query and the KV heads divide. Without a mesh the kernel runs as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, q_seg, kv_seg)
    sizes = dict(mesh.shape)
    batch_axes, rows = [], q.shape[0]
    for a in ("data", "fsdp"):
        if sizes.get(a, 1) > 1 and rows % sizes[a] == 0:
            batch_axes.append(a)
            rows //= sizes[a]
    t = sizes.get("tensor", 1)
    head_axis = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    if not batch_axes and head_axis is None:
        return kernel(q, k, v, q_seg, kv_seg)
    b = tuple(batch_axes) or None
    qkv = P(b, None, head_axis, None)
    seg = P(b, None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, seg if q_seg is not None else None, seg if kv_seg is not None else None),
        out_specs=qkv,
        check_vma=False,
    )(q, k, v, q_seg, kv_seg)


def resolve_impl(impl: str) -> str:
    """``auto``: cuDNN on GPU for full sequences, XLA elsewhere (the Pallas kernel is chosen
    explicitly until it is measured faster on the device in docs/benchmarks.md)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl: expected one of {', '.join(IMPLS)} (got '{impl}')")
    if impl != "auto":
        return impl
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def attention(
    q, k, v, *, impl="auto", causal=True, window=None, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_valid=None, scale=None, mask=None
):
    """Dispatch to the chosen implementation; all take the same arguments. An explicit ``mask``
    (``[q_len, kv_len]`` or ``[batch, q_len, kv_len]``, True = visible) always runs on XLA."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}")
    if mask is not None:
        if mask.shape[-2:] != (q.shape[1], k.shape[1]):
            raise ValueError(f"attention: mask shape {tuple(mask.shape)} does not end in (q_len, kv_len) = ({q.shape[1]}, {k.shape[1]})")
        return xla_attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_offset=q_offset,
            kv_valid=kv_valid,
            scale=scale,
            mask=mask,
        )
    impl = resolve_impl(impl)
    if impl == "cudnn" and kv_valid is not None:
        impl = "xla"  # decode steps: cuDNN's fused kernel wants full sequences
    fn = {"xla": xla_attention, "cudnn": _cudnn_attention, "pallas": _pallas_attention}[impl]
    return fn(
        q,
        k,
        v,
        causal=causal,
        window=window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
        kv_valid=kv_valid,
        scale=scale,
    )
