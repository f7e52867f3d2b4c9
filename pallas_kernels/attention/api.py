"""Public attention entry points and backend dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._backend import resolve_backend as _resolve_backend
from pallas_kernels._util import next_pow2, round_up
from pallas_kernels.attention import common
from pallas_kernels.attention.common import BlockSizes
from pallas_kernels.attention.decode import combine_splits, flash_decode_partials
from pallas_kernels.attention.mosaic_gpu_fwd import MosaicGpuBlocks, check_supported, flash_fwd_mosaic_gpu
from pallas_kernels.attention.mosaic_tpu import TPU_DEFAULT_BLOCKS, TpuPlan, flash_decode_partials_tpu, flash_tpu_core
from pallas_kernels.attention.reference import attention_reference, decode_reference
from pallas_kernels.attention.triton_bwd import flash_bwd
from pallas_kernels.attention.triton_config import gpu_block_sizes
from pallas_kernels.attention.triton_fwd import AttnStatic, flash_fwd

BACKENDS = ("auto", "gpu", "tpu", "interpret", "tpu_interpret", "reference", "mosaic_gpu", "mosaic_gpu_interpret")


def resolve_backend(backend: str) -> str:
    return _resolve_backend(backend, BACKENDS)


# --------------------------------------------------------------------------------------------
# Segment block ranges
# --------------------------------------------------------------------------------------------

segment_block_ranges = common.segment_block_ranges


# --------------------------------------------------------------------------------------------
# flash_attention
# --------------------------------------------------------------------------------------------


def _plan(bs: BlockSizes, q_len, kv_len):
    """Clipped block sizes and padded lengths (every block size divides its padded length).

    ``bs`` is complete (no None field): the caller filled it from the backend's table."""
    bq = common.clip_block(bs.block_q, q_len)
    bk = common.clip_block(bs.block_k, kv_len)
    bq_dkv = common.clip_block(bs.block_q_dkv, q_len)
    bk_dkv = common.clip_block(bs.block_k_dkv, kv_len)
    bq_dq = common.clip_block(bs.block_q_dq, q_len)
    bk_dq = common.clip_block(bs.block_k_dq, kv_len)
    tp = round_up(q_len, max(bq, bq_dkv, bq_dq))
    sp = round_up(kv_len, max(bk, bk_dkv, bk_dq))
    return dict(
        bq=bq,
        bk=bk,
        bq_dkv=bq_dkv,
        bk_dkv=bk_dkv,
        bq_dq=bq_dq,
        bk_dq=bk_dq,
        tp=tp,
        sp=sp,
        nw=bs.num_warps,
        ns=bs.num_stages,
        nw_dkv=bs.num_warps_bwd,
        ns_dkv=bs.num_stages_bwd,
        nw_dq=bs.num_warps_dq,
        ns_dq=bs.num_stages_dq,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_core(q, k, v, q_seg, kv_seg, st, plan):
    out, _ = _flash_core_fwd(q, k, v, q_seg, kv_seg, st, plan)
    return out


def _ranges(q_seg, kv_seg, plan, which):
    if q_seg is None:
        return None
    if which == "fwd":
        return segment_block_ranges(q_seg, kv_seg, plan["bq"], plan["bk"])
    if which == "dq":
        return segment_block_ranges(q_seg, kv_seg, plan["bq_dq"], plan["bk_dq"])
    return segment_block_ranges(kv_seg, q_seg, plan["bk_dkv"], plan["bq_dkv"])


def _flash_core_fwd(q, k, v, q_seg, kv_seg, st, plan):
    lo, hi = _ranges(q_seg, kv_seg, plan, "fwd") or (None, None)
    out, lse = flash_fwd(q, k, v, q_seg, kv_seg, lo, hi, st=st, block_q=plan["bq"], block_k=plan["bk"], num_warps=plan["nw"], num_stages=plan["ns"])
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_core_bwd(st, plan, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = flash_bwd(
        q,
        k,
        v,
        out,
        lse,
        do,
        q_seg,
        kv_seg,
        _ranges(q_seg, kv_seg, plan, "dq"),
        _ranges(q_seg, kv_seg, plan, "dkv"),
        st=st,
        block_q_dkv=plan["bq_dkv"],
        block_k_dkv=plan["bk_dkv"],
        block_q_dq=plan["bq_dq"],
        block_k_dq=plan["bk_dq"],
        num_warps_dkv=plan["nw_dkv"],
        num_stages_dkv=plan["ns_dkv"],
        num_warps_dq=plan["nw_dq"],
        num_stages_dq=plan["ns_dq"],
    )
    return dq, dk, dv, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash_core_mgpu(q, k, v, st, plan, mblocks):
    out, _ = _flash_core_mgpu_fwd(q, k, v, st, plan, mblocks)
    return out


def _flash_core_mgpu_fwd(q, k, v, st, plan, mblocks):
    out, lse = flash_fwd_mosaic_gpu(q, k, v, scale=st.scale, causal=st.right == 0, blocks=mblocks, interpret=st.interpret)
    return out, (q, k, v, None, None, out, lse)


def _flash_core_mgpu_bwd(st, plan, mblocks, res, do):
    return _flash_core_bwd(st, plan, res, do)[:3]  # the Triton dQ / dK / dV kernels


_flash_core_mgpu.defvjp(_flash_core_mgpu_fwd, _flash_core_mgpu_bwd)


class _Plan(dict):
    """Hashable dict, so the plan can be a custom_vjp non-differentiable argument."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _pad_axis(x, axis, new_len, mode="constant"):
    if x.shape[axis] == new_len:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def flash_attention(
    q, k, v, *, causal=False, local_window_size=None, q_segment_ids=None, kv_segment_ids=None, scale=None, block_sizes=None, backend="auto"
):
    """Memory-efficient (FlashAttention-2) multi-head attention with a Pallas backward pass.

    Args:
      q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]`` with
        ``heads % kv_heads == 0`` (GQA / MQA; K/V are never repeated in memory).
      causal: queries are the LAST ``q_len`` positions: query ``i`` (absolute position
        ``i + kv_len - q_len``) sees keys ``j <= i + kv_len - q_len``.
      local_window_size: int ``w`` (== ``(w, w)``) or ``(left, right)`` as in
        ``jax.nn.dot_product_attention``: the query at absolute position ``p`` sees keys
        ``p - left <= j <= p + right``; with ``causal`` the right reach is 0.
      q_segment_ids / kv_segment_ids: int ``[batch, q_len]`` / ``[batch, kv_len]``; tokens only
        attend within their segment. If only one is given and q_len == kv_len it is used for both.
      scale: logits multiplier, default ``1/sqrt(head_dim)``.
      block_sizes: None, a ``BlockSizes``, a dict of its fields or a ``(block_q, block_k)`` pair.
      backend: "auto" (gpu on GPU, tpu on TPU, interpret on CPU), "gpu" (Pallas Triton),
        "interpret" (the GPU kernel in Pallas interpret mode), "tpu" (Pallas Mosaic TPU; untested
        on hardware), "tpu_interpret" (the TPU kernels under ``pltpu.InterpretParams()``),
        "mosaic_gpu" (Hopper forward on Pallas Mosaic GPU: TMA + wgmma, warp-specialized; backward
        by the Triton kernels; bf16/f16, head_dim 64/128, lengths multiples of 128, causal or full,
        no window/segments; opt-in: ``auto`` never picks it until it is timed faster on a GPU),
        "mosaic_gpu_interpret" (that forward under Mosaic GPU's interpreter, CPU), "reference" (plain jnp).

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; rows with no visible key are 0.
    """
    common.check_attention_args(q, k, v, local_window_size, q_segment_ids, kv_segment_ids)
    backend = resolve_backend(backend)
    if backend == "reference":
        return attention_reference(
            q, k, v, causal=causal, local_window_size=local_window_size, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale
        )
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.dtype not in common.KERNEL_DTYPES:
            raise ValueError(f"{name}: got dtype {a.dtype}, expected one of bfloat16, float16, float32 for the Pallas kernels")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"k, v: got dtypes {k.dtype}, {v.dtype}, expected q's dtype {q.dtype}")
    bs = common.BlockSizes.from_arg(block_sizes)

    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if q_segment_ids is None and kv_segment_ids is not None:
        q_segment_ids = kv_segment_ids
    if kv_segment_ids is None and q_segment_ids is not None:
        kv_segment_ids = q_segment_ids
    left, right = common.window_bounds(causal, local_window_size)
    st = AttnStatic(
        scale=common.default_scale(q, scale),
        left=left,
        right=right,
        q_len=t,
        kv_len=s,
        heads=h,
        kv_heads=kvh,
        has_segments=q_segment_ids is not None,
        interpret=backend in ("interpret", "tpu_interpret", "mosaic_gpu_interpret"),
    )
    if backend in ("tpu", "tpu_interpret"):
        return _flash_attention_tpu(q, k, v, q_segment_ids, kv_segment_ids, st, bs)
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
        mblocks = MosaicGpuBlocks(block_kv=bs.block_k or MosaicGpuBlocks.block_kv, stages=bs.num_stages or MosaicGpuBlocks.stages)
        check_supported(q, k, left=left, right=right, has_segments=st.has_segments, blocks=mblocks)
        plan = _Plan(_plan(bs.with_defaults(gpu_block_sizes(d)), t, s))  # the Triton backward's tiles
        return _flash_core_mgpu(q, k, v, st, plan, mblocks)
    dp = max(16, next_pow2(d))
    plan = _Plan(_plan(bs.with_defaults(gpu_block_sizes(dp)), t, s))

    qp = _pad_axis(_pad_axis(q, 1, plan["tp"]), 3, dp)
    kp = _pad_axis(_pad_axis(k, 1, plan["sp"]), 3, dp)
    vp = _pad_axis(_pad_axis(v, 1, plan["sp"]), 3, dp)
    q_seg = kv_seg = None
    if st.has_segments:  # edge padding keeps the per-block segment ranges tight
        q_seg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, plan["tp"], mode="edge")
        kv_seg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, plan["sp"], mode="edge")
    out = _flash_core(qp, kp, vp, q_seg, kv_seg, st, plan)
    return out[:, :t, :, :d]


def _flash_attention_tpu(q, k, v, q_segment_ids, kv_segment_ids, st, bs):
    t, s = q.shape[1], k.shape[1]
    p = _plan(bs.with_defaults(TPU_DEFAULT_BLOCKS), t, s)
    plan = TpuPlan(bq=p["bq"], bk=p["bk"], bq_dkv=p["bq_dkv"], bk_dkv=p["bk_dkv"], bq_dq=p["bq_dq"], bk_dq=p["bk_dq"], tp=p["tp"], sp=p["sp"])
    qt = _pad_axis(q, 1, plan.tp).transpose(0, 2, 1, 3)  # [B, H, Tp, D]
    kt = _pad_axis(k, 1, plan.sp).transpose(0, 2, 1, 3)
    vt = _pad_axis(v, 1, plan.sp).transpose(0, 2, 1, 3)
    qseg = kseg = None
    if st.has_segments:
        qseg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, plan.tp, mode="edge")[:, :, None]
        kseg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, plan.sp, mode="edge")[:, None, :]
    out = flash_tpu_core(qt, kt, vt, qseg, kseg, st, plan)
    return out.transpose(0, 2, 1, 3)[:, :t]


# --------------------------------------------------------------------------------------------
# flash_decode
# --------------------------------------------------------------------------------------------


def _decode_block_k(cache_len: int, block_k: int) -> int:
    """Largest power of two <= block_k (>= 16) dividing cache_len, else block_k (cache gets padded)."""
    bk = block_k
    while bk > 16 and cache_len % bk:
        bk //= 2
    return bk if cache_len % bk == 0 else block_k


def flash_decode(q, k_cache, v_cache, *, kv_len=None, scale=None, local_window_size=None, num_splits=None, block_k=128, backend="auto"):
    """Flash-decoding attention of 1..16 new query tokens against a KV cache.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` with ``1 <= q_len <= 16``.
      k_cache, v_cache: ``[batch, cache_len, kv_heads, head_dim]`` (GQA/MQA: heads % kv_heads == 0).
      kv_len: int ``[batch]`` number of valid cache entries per sequence (default: cache_len). The
        queries are the last ``q_len`` of them (positions ``kv_len - q_len .. kv_len - 1``) and
        attend causally: query ``t`` sees cache entries ``j <= kv_len - q_len + t``.
      local_window_size: int or ``(left, right)``; only ``left`` matters (causal): keys
        ``j >= position - left``.
      num_splits: number of KV-length chunks processed in parallel (default: enough programs to fill
        a GPU, ~264, capped by the number of KV blocks).
      block_k: KV tile length (power of two >= 16). If no power of two >= 16 divides cache_len the
        cache is padded (a copy): keep cache_len a multiple of 16 (ideally of block_k).
      backend: "auto" (gpu on GPU, tpu on TPU, interpret on CPU) | "gpu" | "interpret" | "tpu"
        (Mosaic; untested on hardware) | "tpu_interpret" | "reference".

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype.
    """
    common.check_decode_args(q, k_cache, v_cache, kv_len)
    backend = resolve_backend(backend)
    if backend.startswith("mosaic_gpu"):
        raise ValueError(
            f"backend: got {backend!r}, which has no flash_decode kernel; expected one of auto, gpu, tpu, interpret, tpu_interpret, reference"
        )
    if backend == "reference":
        return decode_reference(q, k_cache, v_cache, kv_len=kv_len, scale=scale, local_window_size=local_window_size)
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if a.dtype not in common.KERNEL_DTYPES:
            raise ValueError(f"{name}: got dtype {a.dtype}, expected bfloat16, float16 or float32")
    if not (k_cache.dtype == v_cache.dtype):
        raise ValueError(f"v_cache: got dtype {v_cache.dtype}, expected k_cache's {k_cache.dtype}")
    if not isinstance(block_k, int) or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k: got {block_k!r}, expected a power of two >= 16")
    b, t, h, d = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    left, _ = common.window_bounds(True, local_window_size)
    if kv_len is None:
        kv_len = jnp.full((b,), s, jnp.int32)
    kv_len = jnp.clip(jnp.asarray(kv_len, jnp.int32), 0, s)

    bk = _decode_block_k(s, min(block_k, max(16, next_pow2(s))))
    sp = round_up(s, bk)
    n_blocks = sp // bk
    if num_splits is None:
        num_splits = max(1, min(n_blocks, -(-264 // (b * kvh))))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: got {num_splits!r}, expected a positive int")
    num_splits = min(num_splits, n_blocks)

    dp = max(16, next_pow2(d))
    rows = max(16, next_pow2(g * t))
    # [B, T, K, G, D] -> [B, K, G*T, D]: row r is (head g = r // T, token t = r % T).
    q_rows = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    q_rows = _pad_axis(_pad_axis(q_rows.astype(k_cache.dtype), 2, rows), 3, dp)
    kc = _pad_axis(_pad_axis(k_cache, 1, sp), 3, dp)
    vc = _pad_axis(_pad_axis(v_cache, 1, sp), 3, dp)
    if backend in ("tpu", "tpu_interpret"):
        o_part, lse_part = flash_decode_partials_tpu(
            q_rows,
            kc.transpose(0, 2, 1, 3),
            vc.transpose(0, 2, 1, 3),
            kv_len,
            scale=common.default_scale(q, scale),
            q_len=t,
            left=left,
            block_k=bk,
            num_splits=num_splits,
            interpret=backend == "tpu_interpret",
        )
    else:
        o_part, lse_part = flash_decode_partials(
            q_rows,
            kc,
            vc,
            kv_len,
            scale=common.default_scale(q, scale),
            q_len=t,
            left=left,
            block_k=bk,
            num_splits=num_splits,
            num_warps=4,
            num_stages=3 if d <= 128 else 2,
            interpret=backend == "interpret",
        )
    o = combine_splits(o_part, lse_part)[:, :, : g * t, :d]  # [B, K, G*T, D]
    o = o.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return o.astype(q.dtype)
