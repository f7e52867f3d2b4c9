"""experiments/check_sm90.py: the deviceless sm_90a compile check (slow: lowers and compiles ~40 kernels)
and its small pure helpers (fast)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "check_sm90.py"
sys.path.insert(0, str(SCRIPT.parent))
import check_sm90  # noqa: E402


def test_ctas_per_sm_from_registers_shared_memory_and_threads():
    # 8 warps x 234 registers (240 per thread after rounding): 61440 of 65536 registers -> 1 CTA.
    assert check_sm90.ctas_per_sm(234, 128 * 1024, 8, 90) == 1
    # 4 warps x 70 registers, 36 KiB: shared memory limits it to 228 // 37 = 6 CTAs.
    assert check_sm90.ctas_per_sm(70, 36 * 1024, 4, 90) == 6
    # threads limit: 16 warps (512 threads) with few registers -> 4 CTAs.
    assert check_sm90.ctas_per_sm(32, 0, 16, 90) == 4


def test_ptx_features_names_the_tensor_core_path():
    assert check_sm90.ptx_features("wgmma.mma_async.sync.aligned.m64n64k16 ...; cp.async.cg.shared")["mma"] == "wgmma"
    assert check_sm90.ptx_features("mma.sync.aligned.m16n8k16 ...")["mma"] == "mma.sync"
    f = check_sm90.ptx_features("ld.global.v4.u32 ...")
    assert f == {"mma": "-", "copies": "sync"}


def test_missing_side_environment_is_a_clear_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--env", str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("env: ") and "--make-env" in proc.stderr


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90a_without_spills():
    """Builds the triton 3.6 side environment when it is missing (skips if PyPI is unreachable)."""
    env = Path(os.environ.get("SM90_ENV", check_sm90.DEFAULT_ENV))
    if not (env / "bin" / "python").exists():
        made = subprocess.run([sys.executable, str(SCRIPT), "--make-env", str(env)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"could not build the side environment {env}: {made.stderr[-300:]}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--env", str(env)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| case |" not in line]
    assert len(rows) == 44 + 2  # Triton kernels + the two Mosaic GPU forwards
    assert sum("| wgmma |" in r for r in rows) >= 20  # the M >= 64 Triton tiles use Hopper's wgmma
    assert sum(r.startswith("| mosaic_gpu attention fwd") for r in rows) == 2


def test_mosaic_gpu_forward_resources_from_its_lowered_module():
    """Deviceless resource check of the Mosaic GPU attention forward (head_dim 128): 3 warpgroups, TMA
    and wgmma present, shared memory = Q (2 x 64 x 128 bf16) + K/V (3 stages x 2 x 64 x 128 bf16) plus
    small change, within the 227 KiB a CTA may have."""
    ((case, fn, args),) = [c for c in check_sm90.mosaic_gpu_cases() if c[0].endswith("d128")]
    r = check_sm90.mosaic_gpu_report(fn, args)
    assert r["ok"], r
    assert r["threads"] == 384 and r["grid"] == [32, 32, 1]  # (batch * heads, q_len / 128)
    tiles = (2 * 64 * 128 + 3 * 2 * 64 * 128) * 2
    assert tiles <= r["smem"] <= tiles + 8 * 1024 and r["smem"] <= 227 * 1024
    assert r["wgmma"] > 0 and r["tma"] > 0 and r["setmaxnreg"] == 2
