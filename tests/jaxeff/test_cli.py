"""The command line as a new user meets it: bad input is one clear line and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TINY
from jaxeff.cli import main


def _write_cfg(tmp_path, **sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["logging"] = {"run_dir": str(tmp_path / "runs"), "progress": False}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails_cleanly(capsys, tmp_path, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "runs").exists(), "nothing may be written on bad input"


def test_missing_config_file(capsys, tmp_path):
    _fails_cleanly(capsys, tmp_path, ["train", str(tmp_path / "nope.yaml")], "nope.yaml' does not exist")


def test_invalid_yaml_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    _fails_cleanly(capsys, tmp_path, ["train", str(bad)], "invalid YAML at line")


def test_unknown_key_in_the_file_is_named(capsys, tmp_path):
    path = _write_cfg(tmp_path, model={"n_layerz": 3})
    _fails_cleanly(capsys, tmp_path, ["train", str(path)], "model.n_layerz: unknown key")


def test_unknown_key_in_an_override_is_named(capsys, tmp_path):
    path = _write_cfg(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["train", str(path), "optim.learning_rate=1e-3"], "optim.learning_rate: unknown key")


def test_wrong_type_names_the_key_and_the_value(capsys, tmp_path):
    path = _write_cfg(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["train", str(path), "model.n_layers=two"], "model.n_layers: ")


def test_missing_dataset_path(capsys, tmp_path):
    path = _write_cfg(tmp_path, data={"source": "files", "paths": [str(tmp_path / "corpus.jsonl")]})
    _fails_cleanly(capsys, tmp_path, ["train", str(path)], "corpus.jsonl' does not exist")


def test_sequence_length_above_the_model_maximum(capsys, tmp_path):
    path = _write_cfg(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["train", str(path), "data.seq_len=128"], "data.seq_len: 128 is above the model's maximum model.max_seq_len=64")


def test_mesh_that_does_not_divide_the_devices(capsys, tmp_path):
    path = _write_cfg(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["train", str(path), "mesh.tensor=3"], "tensor=3 does not divide the 8 available devices")


def test_mesh_that_uses_the_wrong_number_of_devices(capsys, tmp_path):
    path = _write_cfg(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["train", str(path), "mesh.data=2", "mesh.tensor=2"], "but 8 are available")


def test_checkpoint_from_a_different_model(capsys, tmp_path):
    path = _write_cfg(tmp_path, train={"steps": 2, "eval_every": 2, "log_every": 1}, checkpoint={"every": 2})
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "runs" / "tiny"
    before = sorted(p.name for p in (ckpt / "checkpoints").iterdir())
    code = main(["eval", str(path), "--checkpoint", str(ckpt), "model.n_heads=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is from a different model: model.n_heads is 4 there but 2 here" in err[0]
    assert sorted(p.name for p in (ckpt / "checkpoints").iterdir()) == before


def test_missing_checkpoint_directory(capsys, tmp_path):
    _fails_cleanly(capsys, tmp_path, ["generate", "--checkpoint", str(tmp_path / "x"), "--prompt", "hi"], "does not exist")


def test_existing_run_without_resume_is_refused(capsys, tmp_path):
    path = _write_cfg(tmp_path, train={"steps": 2, "eval_every": 2, "log_every": 1}, checkpoint={"every": 2})
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    assert "pass resume=true" in capsys.readouterr().err


def test_console_script_trains_evaluates_and_generates(tmp_path):
    """End to end through the installed `jaxeff` command, in a fresh process."""
    path = _write_cfg(tmp_path, train={"steps": 4, "eval_every": 4, "log_every": 2}, checkpoint={"every": 4})
    exe = Path(sys.executable).with_name("jaxeff")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([str(exe), *a], capture_output=True, text=True, env=env, timeout=300)
    r = run("train", str(path))
    assert r.returncode == 0, r.stderr
    assert '"step": 4' in r.stdout
    run_dir = tmp_path / "runs" / "tiny"
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    r = run("eval", str(path), "--checkpoint", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "eval/loss/arithmetic" in r.stdout
    r = run("generate", "--checkpoint", str(run_dir), "--prompt", "1+1=", "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1+1=")


def test_the_parser_with_every_family_verb_loads_without_importing_jax():
    import subprocess
    import sys

    code = "import sys, jaxeff.cli as c; c._parser(); sys.exit(int('jax' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_reader_that_stops_early_is_not_an_error():
    """`jaxeff config fields | head -1`: the closed pipe ends the command quietly, exit 0."""
    exe = Path(sys.executable).with_name("jaxeff")
    proc = subprocess.Popen([str(exe), "config", "fields"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command (still importing) writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
