"""FlashAttention forward for Hopper on Pallas Mosaic GPU: TMA loads, wgmma, warp specialization.

jax 0.11.2 deprecates the Pallas Triton lowering; this is the forward pass on its successor. One
program (CTA) per (batch * head, 128 query rows) runs three warpgroups:

* warpgroups 0 and 1 compute, 64 query rows each (the M of one Hopper wgmma). Each keeps its Q tile
  in shared memory, and per KV block: ``S = Q K^T`` by wgmma from shared memory into an fp32
  accumulator, the online softmax in base 2 in registers, ``O += P V`` by wgmma with ``P`` (16-bit)
  taken from registers; then it arrives on the slot's "consumed" barrier.
* warpgroup 2 produces: it streams K and V blocks with TMA (``copy_gmem_to_smem``, completion on a
  per-slot barrier) into a ring of ``stages`` shared-memory slots, reusing a slot once both compute
  warpgroups have consumed it. It gives most of its registers to the compute warpgroups.

Causal masking (queries are the last ``q_len`` positions, as ``flash_attention``) limits each
warpgroup's loop to the blocks it can see and masks only the blocks on the diagonal. GQA reads KV
head ``h // group``. The log-sum-exp is written in base 2 as ``[batch, heads, q_len]`` fp32, the
layout the Triton backward kernels read, so ``backend="mosaic_gpu"`` differentiates through them.

Limits (checked by the caller): bf16/f16, head_dim 64 or 128, q_len and kv_len multiples of 128,
no sliding window or segment ids. Runs on CPU under Mosaic GPU's interpreter (slow: small shapes),
with one difference: there ``P`` goes to ``P V`` through shared memory (the interpreter's wgmma reads
its A operand only from shared memory); compiled, it stays in registers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS_PER_WG = 64  # query rows per compute warpgroup (one wgmma M)
COMPUTE_WGS = 2
BLOCK_Q = ROWS_PER_WG * COMPUTE_WGS
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MosaicGpuBlocks:
    """Tiles of the Mosaic GPU forward kernel: ``block_kv`` keys per step (multiple of 64) and
    ``stages`` K/V shared-memory slots (>= 2).

    Register estimate per compute thread at head_dim 128 (not compiled here: Mosaic GPU compiles inside
    XLA's CUDA plugin, which needs the GPU): O accumulator 64 + P V accumulator 64 + S ``64 x block_kv``
    fp32 (block_kv / 2) + P in 16 bits (block_kv / 4). block_kv = 64 keeps that near 180 of the 232 the
    compute warpgroups get; 128 would be ~240, too close to spilling to choose blind. Shared memory:
    Q 2 x 16 KiB + K/V 3 stages x 2 x 16 KiB = 128 KiB of 227 KiB. Untimed (no GPU yet).
    """

    block_kv: int = 64
    stages: int = 3


def check_supported(q, k, *, left, right, has_segments, blocks: MosaicGpuBlocks):
    """Raises ValueError naming the argument the Mosaic GPU kernel cannot take."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if q.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"q: got dtype {q.dtype}, expected bfloat16 or float16 for backend='mosaic_gpu'")
    if d not in (64, 128):
        raise ValueError(f"q: got head_dim {d}, expected 64 or 128 for backend='mosaic_gpu'")
    if t % BLOCK_Q:
        raise ValueError(f"q: got q_len {t}, expected a multiple of {BLOCK_Q} for backend='mosaic_gpu'")
    if s % blocks.block_kv or s % BLOCK_Q:
        raise ValueError(f"k: got kv_len {s}, expected a multiple of {max(BLOCK_Q, blocks.block_kv)} for backend='mosaic_gpu'")
    if left is not None or (right is not None and right != 0):
        raise ValueError("local_window_size: not supported by backend='mosaic_gpu' (use 'gpu')")
    if right == 0 and s < t:
        raise ValueError(f"k: got kv_len {s} < q_len {t} with causal=True, expected kv_len >= q_len for backend='mosaic_gpu'")
    if has_segments:
        raise ValueError("q_segment_ids: not supported by backend='mosaic_gpu' (use 'gpu')")
    if blocks.block_kv % 64 or blocks.stages < 2:
        raise ValueError(f"block_sizes: got {blocks}, expected block_kv a multiple of 64 and stages >= 2")


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    q_smem,
    k_smem,
    v_smem,
    lse_smem,
    q_bar,
    k_bar,
    v_bar,
    consumed,
    *p_smem,
    scale,
    causal,
    offset,
    heads,
    group,
    block_kv,
    stages,
    n_kv,
):
    bh = lax.axis_index("bh")
    b, h = bh // heads, bh % heads
    kvh = h // group
    wg = lax.axis_index("wg")
    q_first = lax.axis_index("qb") * BLOCK_Q  # first query row of this program
    qk_scale = scale * LOG2E

    def kv_steps_for(row0):
        """KV blocks visible to query rows [row0, row0 + 64): all, or up to the causal diagonal."""
        if not causal:
            return jnp.int32(n_kv)
        last_key = row0 + ROWS_PER_WG - 1 + offset
        return jnp.minimum(lax.div(last_key, jnp.int32(block_kv)) + 1, n_kv)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        row0 = q_first + wg * ROWS_PER_WG
        steps = kv_steps_for(row0)
        my_q = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS_PER_WG), h], my_q, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        d = my_q.shape[-1]
        m = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, d), jnp.float32), plgpu.Layout.WGMMA)

        def step(j, carry, masked):
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, my_q, k_smem.at[slot].T)
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WG, block_kv), jnp.float32)) * qk_scale
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(cols + j * block_kv <= rows + row0 + offset, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))  # finite: every row sees key 0 (kv_len >= q_len)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])

            p16 = p.astype(k_smem.dtype)
            if p_smem:  # interpreter: its wgmma reads A only from shared memory
                p_smem[0].at[wg][...] = p16
                plgpu.commit_smem()
                p16 = p_smem[0].at[wg]

            def pv(pv_ref):
                plgpu.wgmma(pv_ref, p16, v_smem.at[slot])
                return pv_ref[...]

            # P V goes into a fresh accumulator and is added in registers: accumulating into ``acc`` in
            # place (``run_state`` over ``ACC.init(acc)``) saves 64 registers per thread but does not
            # run under Mosaic GPU's interpreter in jax 0.11.2, and the interpreter is our only check.
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS_PER_WG, d), jnp.float32))
            plgpu.barrier_arrive(consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        if causal:  # blocks wholly below the diagonal need no mask
            n_full = jnp.minimum(lax.div(row0 + offset + 1, jnp.int32(block_kv)), steps)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(n_full, steps, functools.partial(step, masked=True), carry)

            # The producer loads as many blocks as the other warpgroup needs: release those slots too.
            # Waiting for each block's K keeps these arrivals in step with the producer (an early arrival
            # could count towards the previous use of the slot).
            @pl.loop(steps, kv_steps_for(q_first + (COMPUTE_WGS - 1) * ROWS_PER_WG))
            def _release(j):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
        else:
            carry = lax.fori_loop(0, steps, functools.partial(step, masked=False), carry)
        acc, m, l = carry
        my_q[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(my_q.dtype)
        lse_smem.at[wg][...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(row0, ROWS_PER_WG), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS_PER_WG)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")
        total = kv_steps_for(q_first + (COMPUTE_WGS - 1) * ROWS_PER_WG)

        def load(j, slot):
            rows = pl.ds(j * block_kv, block_kv)
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])

        @pl.loop(0, jnp.minimum(total, stages))
        def _prologue(j):
            load(j, j)

        @pl.loop(stages, jnp.maximum(total, stages))
        def _steady(j):
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(consumed.at[slot])  # both compute warpgroups are done with block j - stages
            load(j, slot)

        @pl.loop(jnp.maximum(total - stages, 0), total)
        def _drain(j):  # observe the last uses too, so no barrier is released mid-phase
            plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])


def flash_fwd_mosaic_gpu(q, k, v, *, scale: float, causal: bool, blocks: MosaicGpuBlocks, interpret: bool):
    """q [B, T, H, D], k/v [B, S, K, D] (bf16/f16, see ``check_supported``) ->
    (out [B, T, H, D] in q's dtype, lse [B, H, T] fp32 in base 2)."""
    bsz, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    n_kv = s // blocks.block_kv
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, scale=scale, causal=causal, offset=s - t, heads=h, group=h // kvh, block_kv=blocks.block_kv, stages=blocks.stages, n_kv=n_kv
    )
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, t), jnp.float32)),
        scratch_types=(
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), q.dtype, transforms=tiles),
            plgpu.SMEM((blocks.stages, blocks.block_kv, d), k.dtype, transforms=tiles),
            plgpu.SMEM((blocks.stages, blocks.block_kv, d), v.dtype, transforms=tiles),
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=blocks.stages),
            plgpu.Barrier(num_barriers=blocks.stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=blocks.stages),
        )
        + ((plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, blocks.block_kv), q.dtype, transforms=tiles),) if interpret else ()),
        grid=(bsz * h, t // BLOCK_Q),
        grid_names=("bh", "qb"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(q, k, v)
