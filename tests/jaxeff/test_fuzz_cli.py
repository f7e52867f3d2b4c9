"""Bad input fuzz: every verb of the command line, fed wrong files, values, options and folders,
answers with exit code 2, exactly one line on stderr (``error: ...``; argparse mistakes: ``jaxeff
...: error: ... (see --help)``), no traceback, and leaves the file tree as it was.

The cases run in-process through :func:`jaxeff.cli.main` (a fresh process per case would cost a JAX
import each); one small run, its Hugging Face export and a few damaged copies are made once for the
module. SIGTERM during start-up needs a real process and has its own test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from jaxeff.cli import main

RUN = "runs/tiny"  # the module's trained run (lm, steps 2 and 4), relative to the world folder


def _write_cfg(path: Path, run_dir: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["logging"] = {"run_dir": str(run_dir), "progress": False}
    raw["train"] = {**raw["train"], "steps": 4, "eval_every": 4, "log_every": 2}
    raw["checkpoint"] = {"every": 2, "keep": 5}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with: ``exp.yaml`` (tiny config, run dir ``runs/``), a trained run ``runs/tiny``, its
    Hugging Face export ``hf/`` and damaged copies of it, and bad config / data / recipe files."""
    w = tmp_path_factory.mktemp("fuzz")
    cfg = _write_cfg(w / "exp.yaml", w / "runs")
    assert main(["train", str(cfg)]) == 0
    assert main(["convert", "--from", str(w / RUN), "--to-hf", str(w / "hf")]) == 0
    hf_cfg = json.loads((w / "hf" / "config.json").read_text())
    shard = w / "hf" / "model.safetensors"
    # Hugging Face folders that do not load: config.json of another size, a truncated shard, layers missing
    for name, config, data in [
        ("hf_mismatch", {**hf_cfg, "intermediate_size": hf_cfg["intermediate_size"] * 2}, None),
        ("hf_truncated", hf_cfg, shard.read_bytes()[:-100]),
        ("hf_missing_layers", {**hf_cfg, "num_hidden_layers": hf_cfg["num_hidden_layers"] + 1}, None),
        ("hf_bad_json", None, None),
    ]:
        shutil.copytree(w / "hf", w / name)
        if config is not None:
            (w / name / "config.json").write_text(json.dumps(config))
        else:
            (w / name / "config.json").write_bytes(b"\x00\xff{not json")
        if data is not None:
            (w / name / "model.safetensors").write_bytes(data)
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "bad_utf8.txt").write_bytes(b"good text then \xff\xfe\xfa bad bytes\n" * 20)
    (w / "bad_utf8.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n' * 20)
    (w / "not.parquet").write_bytes(bytes(range(256)))
    (w / "empty.txt").write_bytes(b"")
    (w / "recipe_binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8")
    (w / "recipe_unknown.yaml").write_text(
        yaml.safe_dump({"base": str(w / RUN), "out": str(w / "merged"), "models": {"a": {"path": str(w / RUN)}}, "lamda": 1})
    )
    (w / "recipe_missing_run.yaml").write_text(
        yaml.safe_dump({"base": str(w / RUN), "out": str(w / "merged"), "models": {"a": {"path": str(w / "runs/nope")}}})
    )
    (w / "adapter_not").mkdir()  # a folder without adapter.json
    return w


def _tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else None, st.st_mtime_ns)
    return out


# (id, argv with {w} for the world folder, text the one stderr line must contain)
# a new run name per case ({id}), so that each case meets the check it is about (not the refusal to reuse
# a run); the prompt and token counts fit the model, so only the option under test is wrong
T = ["train", "{w}/exp.yaml", "name={id}"]
G = ["generate", "--checkpoint", "{w}/" + RUN, "--max-new-tokens", "4", "--prompt", "1+1="]
S = ["speculate", "--target", "{w}/" + RUN, "--draft", "{w}/" + RUN, "--max-new-tokens", "4", "--prompt", "1+1="]
SP = ["sparsify", "--checkpoint", "{w}/" + RUN, "--out", "{w}/pruned", "--no-eval"]
CASES = [
    # --- the command line itself (argparse)
    ("no-verb", [], "required: command"),
    ("unknown-verb", ["trian"], "invalid choice: 'trian'"),
    ("train-no-config", ["train"], "required: config"),
    ("train-unknown-option", [*T, "--bogus"], "unrecognized arguments: --bogus"),
    ("train-word-not-override", [*T, "steps"], "override 'steps': expected key=value"),
    ("eval-step-not-int", ["eval", "{w}/exp.yaml", "--checkpoint", "{w}/" + RUN, "--step", "two"], "--step: invalid int value: 'two'"),
    ("generate-no-prompt", ["generate", "--checkpoint", "{w}/" + RUN], "required: --prompt"),
    ("generate-temperature-word", [*G, "--temperature", "hot"], "--temperature: invalid float value: 'hot'"),
    # --- train: config files and values
    ("config-missing", ["train", "{w}/nope.yaml"], "nope.yaml' does not exist"),
    ("config-is-a-folder", ["train", "{w}/hf"], "hf' is a folder"),
    ("config-binary", ["train", "{w}/binary.yaml"], "binary.yaml': not UTF-8 text"),
    ("config-latin1", ["train", "{w}/latin1.yaml"], "latin1.yaml': not UTF-8 text"),
    ("config-top-level-list", ["train", "{w}/list.yaml"], "expected a mapping of sections"),
    ("override-unknown-key", [*T, "optim.learning_rate=1e-3"], "optim.learning_rate: unknown key"),
    ("override-wrong-type", [*T, "model.n_layers=two"], "model.n_layers: "),
    ("override-bad-yaml", [*T, "model.d_ff=[1,"], "override 'model.d_ff=[1,': value is not valid YAML"),
    ("override-no-key", [*T, "=3"], "expected key=value"),
    ("override-under-a-value", [*T, "model.d_model.x=1"], "model.d_model: is a value"),
    ("d-model-overflow", [*T, "model.d_model=1000000000000"], "model.d_model: "),
    ("steps-overflow", [*T, "train.steps=99999999999999999999999"], "train.steps: "),
    ("seed-overflow", [*T, "seed=99999999999999999999999"], "seed: "),
    ("negative-steps", [*T, "train.steps=-5"], "train.steps: "),
    ("lr-negative", [*T, "optim.lr=-1"], "optim.lr: "),
    ("lr-infinite", [*T, "optim.lr=.inf"], "optim.lr: "),
    ("lr-nan", [*T, "optim.lr=.nan"], "optim.lr: "),
    ("unknown-method", [*T, "method=nosuch"], "unknown method 'nosuch'"),
    ("name-with-slash", [*T, "name=a/b"], "name: expected a plain folder name"),
    ("seq-len-above-max", [*T, "data.seq_len=128"], "data.seq_len: 128 is above"),
    ("mesh-not-dividing", [*T, "mesh.tensor=3"], "tensor=3 does not divide"),
    ("unknown-domain", [*T, "data.domains=[poetry]"], "unknown domain 'poetry'"),
    ("existing-run-without-resume", ["train", "{w}/exp.yaml"], "pass resume=true"),
    ("data-file-missing", [*T, "data.source=files", "data.paths=[{w}/nope.txt]"], "nope.txt' does not exist"),
    ("data-text-not-utf8", [*T, "data.source=files", "data.paths=[{w}/bad_utf8.txt]"], "bad_utf8.txt' is not UTF-8 text (byte 0xff at offset 15)"),
    (
        "data-not-parquet",
        [*T, "data.source=files", "data.paths=[{w}/not.parquet]"],
        "not.parquet' as parquet: ArrowInvalid: Parquet magic bytes not found",
    ),
    ("data-file-empty", [*T, "data.source=files", "data.paths=[{w}/empty.txt]"], "produced no training rows"),
    ("tokenizer-missing", [*T, "data.tokenizer={w}/nope.json"], "data.tokenizer: file"),
    ("run-dir-under-a-file", [*T, "logging.run_dir={w}/exp.yaml/runs"], "logging.run_dir: "),
    ("data-jsonl-not-utf8", [*T, "data.source=files", "data.paths=[{w}/bad_utf8.jsonl]"], "bad_utf8.jsonl' is not UTF-8 text (byte 0xe9 at offset 13)"),
    ("init-from-missing-run", [*T, "train.init_from={w}/runs/no_such_run"], "no_such_run"),
    ("init-from-missing-hf", [*T, "train.init_from=hf:{w}/no_such"], "no_such"),
    ("init-from-other-model", [*T, "train.init_from={w}/" + RUN, "model.d_model=64"], "model.d_model"),
    # --- eval
    ("eval-missing-checkpoint", ["eval", "{w}/exp.yaml", "--checkpoint", "{w}/runs/nope"], "does not exist"),
    ("eval-missing-step", ["eval", "{w}/exp.yaml", "--checkpoint", "{w}/" + RUN, "--step", "999"], "999"),
    ("eval-negative-step", ["eval", "{w}/exp.yaml", "--checkpoint", "{w}/" + RUN, "--step", "-1"], "no step -1"),
    ("eval-other-model", ["eval", "{w}/exp.yaml", "--checkpoint", "{w}/" + RUN, "model.n_heads=2"], "model.n_heads is 4 there but 2 here"),
    # --- generate
    ("generate-prompt-not-utf8", ["generate", "--checkpoint", "{w}/" + RUN, "--prompt", "\udcff\udcfe"], "--prompt: not valid UTF-8"),
    ("generate-top-k-negative", [*G, "--top-k", "-5", "--temperature", "1"], "--top-k: expected"),
    ("generate-top-k-above-vocab", [*G, "--top-k", "100000", "--temperature", "1"], "--top-k: expected"),
    ("generate-top-k-above-vocab-greedy", [*G, "--top-k", "100000"], "--top-k: expected"),
    ("generate-temperature-negative", [*G, "--temperature", "-1"], "--temperature: expected"),
    ("generate-temperature-nan", [*G, "--temperature", "nan"], "--temperature: expected"),
    ("generate-temperature-inf", [*G, "--temperature", "inf"], "--temperature: expected"),
    ("generate-seed-too-large", [*G, "--seed", "99999999999999999999999"], "--seed: expected an integer"),
    (
        "generate-steer-scale-nan",
        [*G, "--steer-pos", "a", "--steer-neg", "b", "--steer-layer", "0", "--steer-scale", "nan"],
        "--steer-scale: expected a finite number",
    ),
    ("generate-zero-new-tokens", [*G, "--max-new-tokens", "0"], "--max-new-tokens: expected a positive number"),
    ("generate-too-many-tokens", [*G, "--max-new-tokens", "1000"], "exceed the model's max_seq_len=64"),
    ("generate-missing-step", [*G, "--step", "999"], "999"),
    ("generate-missing-checkpoint", ["generate", "--checkpoint", "{w}/runs/nope", "--prompt", "a"], "does not exist"),
    ("generate-steer-layer-out-of-range", [*G, "--steer-pos", "a", "--steer-neg", "b", "--steer-layer", "9"], "--steer-layer"),
    ("generate-steer-vector-missing", [*G, "--steer-vector", "{w}/nope.npz"], "nope.npz"),
    # --- convert
    ("convert-nothing", ["convert"], "convert: give --from-hf DIR"),
    ("convert-both-directions", ["convert", "--from-hf", "{w}/hf", "--from", "{w}/" + RUN], "not both"),
    ("convert-from-without-to-hf", ["convert", "--from", "{w}/" + RUN], "needs --to-hf"),
    ("convert-hf-missing", ["convert", "--from-hf", "{w}/nope", "--out", "{w}/runs/c0"], "does not exist"),
    ("convert-hf-config-mismatch", ["convert", "--from-hf", "{w}/hf_mismatch", "--out", "{w}/runs/c1"], "shape"),
    ("convert-hf-truncated-shard", ["convert", "--from-hf", "{w}/hf_truncated", "--out", "{w}/runs/c2"], "cannot be read"),
    ("convert-hf-missing-layers", ["convert", "--from-hf", "{w}/hf_missing_layers", "--out", "{w}/runs/c3"], "model.layers.2"),
    ("convert-hf-config-not-json", ["convert", "--from-hf", "{w}/hf_bad_json", "--out", "{w}/runs/c4"], "config.json"),
    ("convert-hf-out-under-a-file", ["convert", "--from-hf", "{w}/hf", "--out", "{w}/exp.yaml/run"], "exp.yaml' is a file"),
    ("convert-to-hf-under-a-file", ["convert", "--from", "{w}/" + RUN, "--to-hf", "{w}/exp.yaml/hf"], "exp.yaml' is a file"),
    ("convert-hf-bad-dtype", ["convert", "--from-hf", "{w}/hf", "--out", "{w}/runs/c5", "--dtype", "float64"], "--dtype"),
    ("convert-hf-onto-existing-run", ["convert", "--from-hf", "{w}/hf", "--out", "{w}/" + RUN], "already"),
    ("convert-to-hf-missing-run", ["convert", "--from", "{w}/runs/nope", "--to-hf", "{w}/out_hf"], "does not exist"),
    ("convert-to-hf-bad-dtype", ["convert", "--from", "{w}/" + RUN, "--to-hf", "{w}/out_hf", "--dtype", "int8"], "--dtype"),
    # --- merge
    ("merge-recipe-missing", ["merge", "{w}/nope.yaml"], "nope.yaml' does not exist"),
    ("merge-recipe-binary", ["merge", "{w}/recipe_binary.yaml"], "not UTF-8 text"),
    ("merge-recipe-unknown-key", ["merge", "{w}/recipe_unknown.yaml"], "lamda: unknown key"),
    ("merge-recipe-missing-run", ["merge", "{w}/recipe_missing_run.yaml"], "does not exist"),
    # --- sparsify
    ("sparsify-sparsity-above-1", [*SP, "--sparsity", "1.5"], "--sparsity: expected a number in [0, 1)"),
    ("sparsify-sparsity-nan", [*SP, "--sparsity", "nan"], "--sparsity: expected a number in [0, 1)"),
    ("sparsify-nm-n-above-m", [*SP, "--nm", "5:4"], "--nm: N must not exceed M"),
    ("sparsify-both", [*SP, "--sparsity", "0.5", "--nm", "2:4"], "give exactly one"),
    ("sparsify-unknown-method", [*SP, "--sparsity", "0.5", "--method", "random"], "--method: expected"),
    ("sparsify-missing-run", ["sparsify", "--checkpoint", "{w}/runs/nope", "--out", "{w}/pruned", "--sparsity", "0.5"], "does not exist"),
    ("sparsify-no-calibration", [*SP, "--sparsity", "0.5", "--calib-batches", "0"], "calib"),
    # --- speculate
    ("speculate-gamma-zero", [*S, "--gamma", "0"], "--gamma: expected a positive number"),
    ("speculate-temperature-negative", [*S, "--temperature", "-1"], "--temperature: expected"),
    ("speculate-temperature-nan", [*S, "--temperature", "nan"], "--temperature: expected"),
    ("speculate-top-k-negative", [*S, "--top-k", "-5", "--temperature", "1"], "--top-k: expected"),
    ("speculate-prompt-not-utf8", [*S[:-1], "\udcff"], "--prompt: not valid UTF-8"),
    ("speculate-seed-too-large", [*S, "--seed", "-99999999999999999999999"], "--seed: expected an integer"),
    ("speculate-missing-draft", ["speculate", "--target", "{w}/" + RUN, "--draft", "{w}/runs/nope", "--prompt", "a"], "does not exist"),
    # --- extract (needs a shear run)
    ("extract-from-an-lm-run", ["extract", "--checkpoint", "{w}/" + RUN, "--out", "{w}/x"], "shear"),
    ("extract-missing-run", ["extract", "--checkpoint", "{w}/runs/nope", "--out", "{w}/x"], "does not exist"),
    # --- adapters
    ("export-adapter-from-an-lm-run", ["export-adapter", "--checkpoint", "{w}/" + RUN, "--out", "{w}/ad"], "lora"),
    ("export-adapter-missing-run", ["export-adapter", "--checkpoint", "{w}/runs/nope", "--out", "{w}/ad"], "does not exist"),
    ("merge-adapter-missing-adapter", ["merge-adapter", "--base", "{w}/" + RUN, "--adapter", "{w}/nope", "--out", "{w}/runs/m"], "nope"),
    ("merge-adapter-folder-without-adapter", ["merge-adapter", "--base", "{w}/" + RUN, "--adapter", "{w}/adapter_not", "--out", "{w}/runs/m"], "adapter"),
    ("import-adapter-missing-adapter", ["import-adapter", "--base", "{w}/" + RUN, "--adapter", "{w}/nope", "--out", "{w}/runs/imp"], "nope"),
    (
        "import-adapter-folder-without-adapter",
        ["import-adapter", "--base", "{w}/" + RUN, "--adapter", "{w}/adapter_not", "--out", "{w}/runs/imp"],
        "adapter",
    ),
    # --- steer-vector
    (
        "steer-vector-prompt-not-utf8",
        ["steer-vector", "--checkpoint", "{w}/" + RUN, "--pos", "\udcfe", "--neg", "b", "--layer", "0", "--out", "{w}/v.npz"],
        "--pos: not valid UTF-8",
    ),
    (
        "steer-vector-out-is-a-folder",
        ["steer-vector", "--checkpoint", "{w}/" + RUN, "--pos", "a", "--neg", "b", "--layer", "0", "--out", "{w}/hf"],
        "--out: ",
    ),
    (
        "steer-vector-layer-out-of-range",
        ["steer-vector", "--checkpoint", "{w}/" + RUN, "--pos", "a", "--neg", "b", "--layer", "9", "--out", "{w}/v.npz"],
        "--layer",
    ),
]


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, capfd, case, argv, expected):
    argv = [a.replace("{w}", str(world)).replace("{id}", case) for a in argv]
    capfd.readouterr()
    before = _tree(world)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out, err[-3000:]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, lines[:20]
    assert "error: " in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert _tree(world) == before, "bad input must leave the file tree as it was"


def test_there_are_at_least_40_distinct_cases_over_every_verb():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40
    verbs = {c[1][0] for c in CASES if c[1]}
    assert verbs >= {"train", "eval", "generate", "convert", "merge", "sparsify", "speculate", "extract", "export-adapter"}


def _wait_until_sigterm_is_caught(pid: int, timeout_s: float = 60.0) -> None:
    """Until ``jaxeff.cli.main`` has installed its SIGTERM handler (Linux: the SigCgt mask of
    /proc/PID/status); elsewhere a fixed 0.5 s."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(0.5)
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        caught = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"jaxeff did not install a SIGTERM handler within {timeout_s} s")


@pytest.mark.parametrize("delay_s", [0.0, 2.0])
def test_sigterm_during_start_up_exits_130_with_one_line(world, delay_s):
    """From the moment ``main`` starts until training's own handler is installed (imports, config, data)
    SIGTERM exits 130, not -15."""
    exe = str(Path(sys.executable).with_name("jaxeff"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [exe, "train", str(world / "exp.yaml"), f"name=sigterm_{delay_s}", "train.steps=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_until_sigterm_is_caught(proc.pid)  # the interpreter's own start-up keeps the default action
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert lines[-1].startswith("interrupted"), lines
    shutil.rmtree(world / "runs" / f"sigterm_{delay_s}", ignore_errors=True)
