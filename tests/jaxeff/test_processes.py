"""Whole runs in fresh processes: two processes forming one mesh, and Ctrl-C mid-training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import TINY

EXE = str(Path(sys.executable).with_name("jaxeff"))


def _cfg(tmp_path, **train):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["logging"] = {"run_dir": str(tmp_path / "runs"), "progress": False}
    raw["train"] = {**raw["train"], **train}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(devices):
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _summary(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_two_processes_with_4_devices_each_train_like_one_process_with_8(tmp_path):
    """Tolerance: the losses agree to 1e-5 and the final parameters to 1e-6 (float32; the same
    shardings, with collectives over gloo instead of in-process)."""
    cfg = _cfg(tmp_path, steps=4, eval_every=4)
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                EXE,
                "train",
                str(cfg),
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
                "name=two",
                *mesh,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(4),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    single = subprocess.run([EXE, "train", str(cfg), "name=one", *mesh], capture_output=True, text=True, env=_env(8), timeout=300)
    assert single.returncode == 0, single.stderr
    ref = _summary(single.stdout)
    for out, _ in outs:
        got = _summary(out)
        assert got["step"] == 4
        assert abs(got["train/loss"] - ref["train/loss"]) < 1e-5
        assert abs(got["eval/loss"] - ref["eval/loss"]) < 1e-5
    import jax
    import numpy as np

    from jaxeff.config import load_config
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    abstract = Trainer(load_config(cfg, mesh)).abstract_state  # restore onto this process's 8 devices

    def final_params(name):
        ckpt = Checkpointer(tmp_path / "runs" / name / "checkpoints", create=False)
        return ckpt.restore(abstract, 4)[0].params

    for a, b in zip(jax.tree.leaves(final_params("one")), jax.tree.leaves(final_params("two"))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    # process 0 alone writes TensorBoard; checkpoints are written collectively
    assert len(list((tmp_path / "runs" / "two").glob("events.out.tfevents*"))) == 1
    assert sorted(p.name for p in (tmp_path / "runs" / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]


def _logged_steps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        return 0
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return len(acc.Scalars("train/loss")) if "train/loss" in acc.Tags()["scalars"] else 0


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    cfg = _cfg(tmp_path, steps=100000, eval_every=100000, log_every=1)
    proc = subprocess.Popen([EXE, "train", str(cfg), "checkpoint.every=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1))
    events = tmp_path / "runs" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training has logged a few steps
        time.sleep(1)
        if _logged_steps(events) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint at step" in err + out
    steps = [int(p.name) for p in (events / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3
    again = subprocess.run(
        [EXE, "train", str(cfg), "checkpoint.every=100000", f"train.steps={steps[0] + 2}", "--resume"],
        capture_output=True,
        text=True,
        env=_env(1),
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    assert _summary(again.stdout)["step"] == steps[0] + 2


def test_sigterm_to_both_processes_stops_them_at_the_same_step_with_one_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, steps=100000, eval_every=100000, log_every=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                EXE,
                "train",
                str(cfg),
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
                "checkpoint.every=4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(4),
        )
        for i in range(2)
    ]
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.5)
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(0.7)  # the scheduler's signals do not arrive at the same instant
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [130, 130], [o[1][-1500:] for o in outs]
    said = outs[0][0] + outs[0][1]
    assert "interrupted: checkpoint at step" in said
    stopped = int(said.split("interrupted: checkpoint at step ")[1].split()[0])
    assert max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == stopped
