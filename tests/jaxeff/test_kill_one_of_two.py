"""Two processes training one mesh, one of them killed with SIGKILL: the survivor must not go on alone
or hang, and restarting both with ``resume=true`` must reach the uninterrupted run's result
(docs/reliability.md, "Two processes, one killed"). Slow: the survivor of a dead non-coordinator waits
for JAX's heartbeat timeout (about a minute)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY

EXE = str(Path(sys.executable).with_name("jaxeff"))
HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's default; jaxeff does not change it


def _env(devices):
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _summary(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _two(cfg, name, *extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            [
                EXE,
                "train",
                str(cfg),
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
                f"name={name}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_env(4),
        )
        for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["non-coordinator", "coordinator"])
def test_kill_9_of_one_process_stops_the_other_and_both_resume_to_the_uninterrupted_result(tmp_path, victim):
    raw = json.loads(json.dumps(TINY))
    raw["logging"] = {"run_dir": str(tmp_path / "runs"), "progress": False}
    raw["optim"] = {**raw["optim"], "schedule": "constant"}  # train.steps then does not change the lr
    raw["train"] = {**raw["train"], "steps": 100000, "eval_every": 100000, "log_every": 2}
    raw["checkpoint"] = {"every": 4, "keep": 5}
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    procs = _two(cfg, "two")
    ckpts = tmp_path / "runs" / "two" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.2)
    time.sleep(1.0)  # mid-training
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.time()
    survivor = procs[1 - victim]
    try:
        code = survivor.wait(timeout=HEARTBEAT_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"the survivor was still running {HEARTBEAT_TIMEOUT_S + 60} s after its peer died")
    waited = time.time() - t0
    procs[victim].wait()
    assert code != 0, "a process whose peer died must not report success"
    if victim == 0:
        assert waited < 30, f"the coordinator died but the survivor took {waited:.1f} s to stop"
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved, "the first checkpoint is still there"
    target = saved[-1] + 4
    again = _two(cfg, "two", f"train.steps={target}", "resume=true")
    outs = [p.communicate(timeout=600)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0]
    assert f"resumed from {ckpts} at step {saved[-1]}" in outs[0]
    ref = subprocess.run([EXE, "train", str(cfg), "name=ref", f"train.steps={target}"], capture_output=True, text=True, env=_env(8), timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = _summary(ref.stdout)
    for out in outs:
        got = _summary(out)
        assert got["step"] == target
        assert abs(got["train/loss"] - want["train/loss"]) < 1e-5
        assert abs(got["eval/loss"] - want["eval/loss"]) < 1e-5
