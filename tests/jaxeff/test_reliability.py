"""Runs that survive what clusters do to them: NaNs, damaged checkpoints, SIGTERM, kill -9."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import TINY
from jaxeff.errors import ConfigError
from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, run_training

EXE = str(Path(sys.executable).with_name("jaxeff"))


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tiny_config):
    cfg = tiny_config(["mesh.data=1", "train.inject_nan_at_step=3", "train.nonfinite=skip"])
    t = Trainer(cfg, devices=jax.devices()[:1])
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    state = t.init_state()
    params = []
    for _ in range(4):
        state, m = t.train_step(state, loader.next_batch())
        params.append(_host(state.params))
    assert int(state.skipped) == 1 and int(state.step) == 4 and int(state.halted_at) == -1
    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2])):
        np.testing.assert_array_equal(a, b)  # step 3's update was dropped
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[2]), jax.tree.leaves(params[3])))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params[3]))


def test_stop_policy_checkpoints_the_last_good_state_and_resume_matches_an_uninterrupted_run(tiny_config):
    straight = tiny_config(["name=straight", "train.log_every=1"])
    run_training(straight)
    poisoned = tiny_config(["name=poisoned", "train.log_every=1", "train.nonfinite=stop", "train.inject_nan_at_step=5"])
    out = run_training(poisoned)
    assert "training halted at step 5" in out["halted"] and "(step 4)" in out["halted"]
    assert Checkpointer(poisoned.checkpoint_path, create=False).latest_step() == 4
    fixed = tiny_config(["name=poisoned", "train.log_every=1", "resume=true"])
    assert run_training(fixed)["step"] == 6
    a = dict(_losses(straight.run_path))
    b = dict(_losses(poisoned.run_path))  # later values per step win: the resumed run's
    assert a[6] == b[6] and a[5] == b[5]


def test_skip_policy_halts_after_max_consecutive_nonfinite_steps(tiny_config):
    cfg = tiny_config(["optim.name=sgd", "optim.lr=1e30", "optim.grad_clip=null", "train.max_skips=3", "train.steps=20", "train.log_every=1"])
    out = run_training(cfg)
    assert "3 consecutive non-finite" in out["halted"]
    step = Checkpointer(cfg.checkpoint_path, create=False).latest_step()
    assert step == out["step"] and step < 20


def test_cli_exits_3_naming_the_step_when_the_guard_halts(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main

    path = tmp_path / "exp.yaml"
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["logging"] = {"run_dir": str(tmp_path / "runs"), "progress": False}
    raw["train"] = {**raw["train"], "nonfinite": "stop", "inject_nan_at_step": 2}
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 3
    assert "training halted at step 2" in capsys.readouterr().err


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_config, capsys):
    straight = tiny_config(["name=straight", "train.log_every=1", "train.steps=8"])
    run_training(straight)
    cfg = tiny_config(["name=damaged", "train.log_every=1"])
    run_training(cfg)  # checkpoints at 3 and 6
    for f in (cfg.checkpoint_path / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    out = run_training(tiny_config(["name=damaged", "train.log_every=1", "train.steps=8", "resume=true"]))
    said = capsys.readouterr()
    assert "checkpoint step 6" in said.err and "moved to 6.unreadable" in said.err and "at step 3" in said.out
    assert out["step"] == 8
    assert dict(_losses(straight.run_path))[8] == dict(_losses(cfg.run_path))[8]


def test_an_unwritable_run_directory_is_refused_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config([f"logging.run_dir={blocker}/runs"])
    with pytest.raises(ConfigError, match="logging.run_dir: .* is not writable"):
        run_training(cfg)


# ---------------------------------------------------------------------------------------------
# whole processes


def _cfg_file(tmp_path, name, **train):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["name"] = name
    raw["logging"] = {"run_dir": str(tmp_path / "runs"), "progress": False}
    raw["train"] = {**raw["train"], **train}
    raw["checkpoint"] = {"every": 2, "keep": 3}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def _summary(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _final_params(run_dir):
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", create=False)
    step = ckpt.latest_step()
    import orbax.checkpoint as ocp

    out = ckpt._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, out["state"]["params"]


def _latest(ckpt_dir: Path) -> int:
    done = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.exists() else []
    return max(done, default=-1)


def _kill_fuzz(tmp_path, kills, seed):
    """Kill -9 at random moments: each try arms at a random checkpoint step (waits until the run
    has written it), then kills after a random 0-0.5 s more, which lands mid-step, mid-eval or
    mid-checkpoint-write. The run is resumed with the same command until it finishes."""
    steps, every = 60, 5
    ref_cfg = _cfg_file(tmp_path, "reference", steps=steps, eval_every=20, log_every=1)
    ref = _run(["train", str(ref_cfg), f"checkpoint.every={every}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    cfg = _cfg_file(tmp_path, "killed", steps=steps, eval_every=20, log_every=1)
    ckpt_dir = tmp_path / "runs" / "killed" / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    rng = random.Random(seed)
    targets = sorted(rng.randrange(0, steps - every, every) for _ in range(kills))  # repeats: kill again soon after a resume
    outcomes = []
    for target in targets:
        proc = subprocess.Popen(
            [EXE, "train", str(cfg), "resume=true", f"checkpoint.every={every}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        deadline = time.time() + 240
        while proc.poll() is None and _latest(ckpt_dir) < target and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        outcomes.append((target, _latest(ckpt_dir), proc.returncode))
    print("kill outcomes (armed at checkpoint, newest complete checkpoint after the kill, exit code):", outcomes)
    assert any(code == -signal.SIGKILL for _, _, code in outcomes)
    final = _run(["train", str(cfg), "resume=true", f"checkpoint.every={every}"])
    assert final.returncode == 0, final.stderr[-2000:]
    got, want = _summary(final.stdout), _summary(ref.stdout)
    assert got["step"] == want["step"] == steps
    assert got["train/loss"] == want["train/loss"] and got["eval/loss"] == want["eval/loss"]
    (s1, p1), (s2, p2) = _final_params(tmp_path / "runs" / "reference"), _final_params(tmp_path / "runs" / "killed")
    assert s1 == s2 == steps
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    return outcomes


def test_kill_9_at_five_random_moments_then_resume_is_bit_identical(tmp_path):
    _kill_fuzz(tmp_path, kills=5, seed=0)


@pytest.mark.slow
def test_kill_9_fuzz_twenty_random_moments(tmp_path):
    _kill_fuzz(tmp_path, kills=20, seed=1)


def test_sigterm_checkpoints_and_the_same_command_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 40
    ref_cfg = _cfg_file(tmp_path, "reference", steps=steps, eval_every=steps, log_every=1)
    ref = _run(["train", str(ref_cfg)])
    cfg = _cfg_file(tmp_path, "term", steps=steps, eval_every=steps, log_every=1)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([EXE, "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ckpts = tmp_path / "runs" / "term" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped = Checkpointer(ckpts, create=False).latest_step()
    assert 0 < stopped < steps
    again = _run(["train", str(cfg), "resume=true"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert _summary(again.stdout)["train/loss"] == _summary(ref.stdout)["train/loss"]
    assert _summary(again.stdout)["eval/loss"] == _summary(ref.stdout)["eval/loss"]


def test_a_checkpoint_written_by_another_method_is_refused_naming_both(tiny_config):
    from jaxeff.errors import CheckpointError

    lm = tiny_config(["train.steps=3"])
    run_training(lm)
    other = tiny_config(["train.steps=6", "resume=true", "method=distill", f"distill.teacher_checkpoint={lm.run_path}"])
    with pytest.raises(CheckpointError, match="written by method 'lm', not 'distill'"):
        run_training(other)


def test_too_little_disk_space_for_checkpoints_is_refused_before_training(tiny_config, monkeypatch):
    import shutil as _shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    cfg = tiny_config([])
    with pytest.raises(ConfigError, match=r"checkpoint.dir: .* MiB free, a checkpoint needs about"):
        run_training(cfg)
    assert not cfg.run_path.exists()


def test_distributed_settings_come_from_the_environment(tiny_config, monkeypatch):
    from jaxeff.train import loop

    calls = []
    monkeypatch.setattr(loop.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(loop.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    loop.setup_distributed(tiny_config([]))
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]
    monkeypatch.setenv("JAX_PROCESS_ID", "three")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID: expected an integer"):
        loop.setup_distributed(tiny_config([]))
