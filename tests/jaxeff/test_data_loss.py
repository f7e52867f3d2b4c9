"""Nothing lost and nothing silently wrong: a checkpoint that does not fit the config is refused,
not quarantined; a bit flip is caught by checksums; a non-finite state is never saved as good; a
full disk is one line; TensorBoard points survive kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from conftest import TINY
from jaxeff.errors import CheckpointError, DiskFullError
from jaxeff.train.checkpoint import CHECKSUMS, Checkpointer
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, run_training
from jaxeff.train.step import make_train_step

EXE = str(Path(sys.executable).with_name("jaxeff"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _flip_bytes(step_dir: Path, n: int = 64) -> Path:
    """Invert ``n`` bytes in the middle of the largest array data file of a step."""
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def _params(run_path: Path, step=None):
    with Checkpointer(run_path / "checkpoints", create=False) as ckpt:
        import orbax.checkpoint as ocp

        step = step or ckpt.latest_step()
        out = ckpt._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"]["params"]


def test_resume_with_another_optimizer_is_refused_naming_the_setting_and_moves_nothing(tiny_config):
    run_training(tiny_config(["name=r"]))  # checkpoints 3 and 6
    ckpts = tiny_config(["name=r"]).checkpoint_path
    before = _tree(ckpts)
    for change, said in (
        (["optim.name=sgd"], "optim.name is 'adamw' there, 'sgd' here"),
        (["optim.grad_clip=null"], "optim.grad_clip is 1.0 there, None here"),
    ):
        with pytest.raises(CheckpointError, match="does not fit this run's train state") as e:
            run_training(tiny_config(["name=r", "train.steps=8", "resume=true", *change]))
        assert said in str(e.value) and "\n" not in str(e.value)
        assert _tree(ckpts) == before  # nothing quarantined, nothing written
    assert run_training(tiny_config(["name=r", "train.steps=8", "resume=true"]))["step"] == 8


def test_a_64_byte_flip_is_caught_by_the_checksum_and_the_previous_checkpoint_resumes(tiny_config, capsys):
    straight = tiny_config(["name=straight", "train.log_every=1", "train.steps=8"])
    want = run_training(straight)
    run_training(tiny_config(["name=flipped", "train.log_every=1"]))
    cfg = tiny_config(["name=flipped", "train.log_every=1", "train.steps=8", "resume=true"])
    assert (cfg.checkpoint_path / "6" / CHECKSUMS).is_file()
    flipped = _flip_bytes(cfg.checkpoint_path / "6")
    capsys.readouterr()
    got = run_training(cfg)
    said = capsys.readouterr()
    assert f"file state/{flipped.relative_to(cfg.checkpoint_path / '6' / 'state')}" in said.err
    assert "does not match its checksum" in said.err and "moved to 6.unreadable" in said.err
    assert "resumed from" in said.out and "at step 3" in said.out
    assert got["step"] == 8 and got["eval/loss"] == want["eval/loss"] and np.isfinite(got["train/loss"])


def test_eval_of_a_damaged_checkpoint_names_the_file(tiny_config):
    from jaxeff.train.loop import load_params

    cfg = tiny_config(["name=ev"])
    run_training(cfg)
    _flip_bytes(cfg.checkpoint_path / "6")
    with pytest.raises(CheckpointError, match=r"step 6 is damaged: file state/.* does not match its checksum"):
        load_params(cfg, cfg.checkpoint_path)


def test_only_damaged_checkpoints_left_refuses_to_start_over_unless_asked(tiny_config, capsys):
    cfg = tiny_config(["name=gone"])
    run_training(cfg)
    for step in (3, 6):
        _flip_bytes(cfg.checkpoint_path / str(step))
    resume = ["name=gone", "train.steps=8", "resume=true"]
    with pytest.raises(
        CheckpointError,
        match=r"no usable checkpoint among steps \[6, 3\] \(moved aside: "
        r"6.unreadable, 3.unreadable\)",
    ):
        run_training(tiny_config(resume))
    assert capsys.readouterr().err.count("warning: checkpoint step") == 2  # each move told as it happened
    with pytest.raises(
        CheckpointError,
        match=r"only damaged ones set aside \(3.unreadable, 6.unreadable\).*"
        r"checkpoint.restart_if_damaged=true",
    ):
        run_training(tiny_config(resume))
    assert not (cfg.checkpoint_path / "8").exists()
    out = run_training(tiny_config([*resume, "checkpoint.restart_if_damaged=true"]))
    assert out["step"] == 8 and (cfg.checkpoint_path / "3.unreadable").is_dir()


def test_restored_parameters_that_are_not_finite_count_as_damage(tiny_config, capsys):
    cfg = tiny_config(["name=nan"])
    run_training(cfg)
    t = Trainer(cfg)
    state = t.init_state()
    poisoned = jax.tree.map(lambda x: x * jnp.nan, state.params)
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    with Checkpointer(cfg.checkpoint_path, keep=5) as ckpt:  # intact files (valid checksums), NaN inside
        ckpt.save(7, state.replace(params=poisoned, step=state.step + 7), data_state=loader.state_dict(), config=cfg.to_dict())
    out = run_training(tiny_config(["name=nan", "train.steps=8", "resume=true"]))
    err = capsys.readouterr().err
    assert "checkpoint step 7" in err and "is not finite" in err and "moved to 7.unreadable" in err
    assert out["step"] == 8 and np.isfinite(out["train/loss"])


def test_an_update_that_overflows_the_parameters_is_dropped_inside_the_step(tiny_config):
    cfg = tiny_config(["mesh.data=1"])
    t = Trainer(cfg, devices=jax.devices()[:1])
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    state = t.init_state()
    # finite loss and gradients, but an optimizer whose update is inf (what lr=1e39 amounts to)
    inf_tx = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), g), s))
    step = jax.jit(make_train_step(t.method, inf_tx, nonfinite="skip", max_skips=3))
    before = jax.device_get(state.params)
    with jax.set_mesh(t.mesh):
        state = state.replace(opt_state=inf_tx.init(state.params))
        new, metrics = step(state, t.shard_batch(loader.next_batch()))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(new.skipped) == 1 and int(new.bad_streak) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new.params))):
        np.testing.assert_array_equal(a, b)


def test_a_state_that_is_not_finite_is_never_checkpointed(tiny_config):
    # the guard off: the overflowing SGD update is applied; the checkpoint at step 2 must refuse it
    cfg = tiny_config(
        [
            "name=guard_off",
            "optim.name=sgd",
            "optim.lr=3e38",
            "optim.grad_clip=null",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "train.nonfinite=off",
            "checkpoint.every=2",
            "train.steps=4",
        ]
    )
    out = run_training(cfg)
    assert "is not finite (train.nonfinite=off); not checkpointed" in out["halted"]
    steps = Checkpointer(cfg.checkpoint_path, create=False).all_steps()
    for step in steps:
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(cfg.run_path, step)))


def test_a_run_ending_in_skipped_updates_exits_3_not_0(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main

    raw = {
        **TINY,
        "name": "ends_bad",
        "logging": {"run_dir": str(tmp_path / "runs"), "progress": False},
        "train": {**TINY["train"], "steps": 4, "inject_nan_at_step": 4, "max_skips": 10},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 3
    assert "training ended with 1 consecutive non-finite" in capsys.readouterr().err


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_earlier_checkpoints(tiny_config, monkeypatch):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step == 6:
            (Path(self.directory) / "6.orbax-checkpoint-tmp-1").mkdir()  # a partial write to clean up
            raise ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 60230 bytes to file 20: No space left on device [os_error_code='28']")
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    cfg = tiny_config(["name=full"])
    with pytest.raises(
        DiskFullError,
        match=r"^checkpoint step 6: no space left on .* \(the previous checkpoints "
        r"\[3\] are intact\)$",
    ) as e:
        run_training(cfg)
    assert e.value.exit_code == 4
    assert sorted(p.name for p in cfg.checkpoint_path.iterdir()) == ["3"]
    monkeypatch.undo()
    assert run_training(tiny_config(["name=full", "resume=true"]))["step"] == 6


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _cfg_file(tmp_path, name, **sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw.update(name=name, logging={"run_dir": str(tmp_path / "runs"), "progress": False})
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_really_full_disk_exits_4_with_one_line(tmp_path):
    small = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(small, "1200k"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        cfg = _cfg_file(tmp_path, "full", train={"steps": 60, "eval_every": 30}, checkpoint={"every": 10, "keep": 30, "dir": str(small / "ck")})
        r = subprocess.run([EXE, "train", str(cfg)], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 4, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
        assert r.stderr.startswith("error: checkpoint step ") and "no space left on" in r.stderr
        kept = sorted(p.name for p in (small / "ck").iterdir())
        assert kept and all(name.isdigit() for name in kept)  # the partial write is gone
    finally:
        subprocess.run(["umount", str(small)], capture_output=True, timeout=20)


def test_a_damaged_checkpoint_without_checksums_falls_back_without_tracebacks(tmp_path):
    """Checkpoints written before checksums existed: orbax's own read errors decide, and its
    'Event loop is closed' noise is filtered."""
    cfg = _cfg_file(tmp_path, "old", train={"steps": 6, "eval_every": 6}, checkpoint={"every": 2, "keep": 5})
    assert subprocess.run([EXE, "train", str(cfg)], capture_output=True, env=ENV, timeout=300).returncode == 0
    ckpts = tmp_path / "runs" / "old" / "checkpoints"
    for step in (2, 4, 6):
        (ckpts / str(step) / CHECKSUMS).unlink()
    for f in (ckpts / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    (ckpts / "4" / "state" / "manifest.ocdbt").unlink()
    r = subprocess.run([EXE, "train", str(cfg), "resume=true", "train.steps=8"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: checkpoint step ") for line in lines), r.stderr
    assert "bound method" not in r.stderr and "resumed from" in r.stdout and "at step 2" in r.stdout


def test_tensorboard_points_up_to_the_last_checkpoint_survive_kill_9_and_resume_fills_the_rest(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg_file(tmp_path, "tb", train={"steps": 30, "eval_every": 30, "log_every": 1}, checkpoint={"every": 5, "keep": 3})
    ckpts = tmp_path / "runs" / "tb" / "checkpoints"
    proc = subprocess.Popen([EXE, "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts / "10").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    def logged():
        acc = EventAccumulator(str(tmp_path / "runs" / "tb"))
        acc.Reload()
        return {e.step for e in acc.Scalars("train/loss")}

    assert set(range(1, 11)) <= logged()  # flushed with checkpoint 10
    r = subprocess.run([EXE, "train", str(cfg), "resume=true"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert logged() == set(range(1, 31))
