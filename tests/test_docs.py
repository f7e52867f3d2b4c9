"""The commands of README.md and docs/*.md run as written (scripts/check_docs.py --quick: training
runs shortened to a few steps, studies skipped). Slow: about 70 commands, one JAX process each."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_documented_command_runs():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_docs.py"), "--quick", "--timeout", "900"], capture_output=True, text=True, cwd=ROOT, timeout=7200
    )
    assert r.returncode == 0, "\n".join(line for line in r.stdout.splitlines() if not line.startswith(("ok", "skip")))
