"""experiments/device_bench.sh: the one-command GPU benchmark, dry-run on CPU (tiny shapes, interpret mode)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "device_bench.sh"


def test_unknown_option_is_a_clear_exit_2():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("argument: unknown option --bogus")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_report(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    report = (tmp_path / "device_bench.md").read_text()
    assert proc.returncode == 0, report[-3000:] + proc.stderr[-2000:]
    assert "DRY RUN" in report
    for step in ("env", "check", "attention", "quant", "train"):
        assert f"| {step} | ok |" in report, f"step {step} not ok:\n{report[:2000]}"
    assert "dense attention, TFLOP/s" in report  # the benchmarks' own tables made it into the report
    assert (tmp_path / "device_bench_logs.txt").stat().st_size > 0
