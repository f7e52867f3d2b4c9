"""Default tiles and Triton parameters of the attention kernels, per GPU generation and head_dim.

Chosen so that no kernel spills registers, checked without a GPU by ``experiments/check_sm90.py``
(``--arch 80 / 90 / 100``; causal bf16, T=4096, 32 query / 8 KV heads, with and without a window and
packed segments). Register counts quoted are sm_90a (ptxas 13.0, Triton 3.6) for head_dim 64 / 128.
None of these has been timed on a GPU yet.

Why these numbers (the budget is 255 registers per thread; fp32 accumulators dominate):

* forward: a ``[block_q, D]`` fp32 accumulator plus the ``[block_q, block_k]`` scores. 128x64 with
  8 warps (two warpgroups, 64 query rows each, as Hopper's wgmma wants) holds D=128 in 234 registers
  (4 warps would need twice that per thread); for D=64 8 warps leave it at 125 registers, 2 CTAs/SM.
* dK/dV: TWO fp32 accumulators ``[block_k, D]`` plus the K and V tiles stay live for the whole
  loop. With 4 warps the Triton tutorial's 32x128 spilled 4.4 KB (D=128) and 0.9 KB (D=64) at
  sm_90a; D=128 fits only with block_k=64 and 8 warps (239 registers, 2 stages keeps the shared
  memory at 64 KiB); D=64 keeps block_k=128 with 8 warps (221).
* dQ: one fp32 ``[block_q, D]`` accumulator; 128x32 with 8 warps (184 / 118 registers); 4 warps
  spilled 1.1 KB at D=128.
* D > 128 (256): half the tiles of D=128 and 2 stages (shared memory): 212 / 167 / 208 registers
  (fwd / dK,dV / dQ) at sm_90a, no spills (also at sm_80 and sm_100a); the least-used entry.

Per generation: sm_90 (H100/H200, wgmma) as above; sm_80 (A100, mma.sync, 163 KiB shared memory
per CTA) and sm_100 (B200, tcgen05) start from it and change what spilled there (below).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._util import gpu_arch
from pallas_kernels.attention.common import BlockSizes

_SM90 = {
    64: BlockSizes(
        block_q=128,
        block_k=64,
        block_q_dkv=32,
        block_k_dkv=128,
        block_q_dq=128,
        block_k_dq=32,
        num_warps=8,
        num_stages=3,
        num_warps_bwd=8,
        num_stages_bwd=2,
        num_warps_dq=8,
        num_stages_dq=3,
    ),
    128: BlockSizes(
        block_q=128,
        block_k=64,
        block_q_dkv=32,
        block_k_dkv=64,
        block_q_dq=128,
        block_k_dq=32,
        num_warps=8,
        num_stages=3,
        num_warps_bwd=8,
        num_stages_bwd=2,
        num_warps_dq=8,
        num_stages_dq=3,
    ),
    256: BlockSizes(
        block_q=64,
        block_k=32,
        block_q_dkv=16,
        block_k_dkv=32,
        block_q_dq=64,
        block_k_dq=16,
        num_warps=8,
        num_stages=2,
        num_warps_bwd=8,
        num_stages_bwd=2,
        num_warps_dq=8,
        num_stages_dq=2,
    ),
}

# sm_80: 128x64 forward tiles at D=128 spilled (mma.sync fragments need more registers than
# wgmma's): 128x32 (174 registers). sm_100: the D=128 dK/dV kernel spilled 48 B at 2 stages; 1 stage
# (170 registers; tcgen05 keeps the dot accumulators in tensor memory, the loads are what is left).
_SM80 = dict(_SM90)
_SM80[128] = dataclasses.replace(_SM90[128], block_k=32)
_SM100 = dict(_SM90)
_SM100[128] = dataclasses.replace(_SM90[128], num_stages_bwd=1)

GPU_TABLE: dict[int, dict[int, BlockSizes]] = {80: _SM80, 90: _SM90, 100: _SM100}


def gpu_block_sizes(head_dim: int, arch: int | None = None) -> BlockSizes:
    """Complete default ``BlockSizes`` for a (padded) head_dim on GPU generation ``arch`` (80/90/100;
    None: the GPU being lowered for, sm_90 without one)."""
    table = GPU_TABLE[gpu_arch() if arch is None else arch]
    for d in sorted(table):
        if head_dim <= d:
            return table[d]
    return table[max(table)]
