"""Config composition (``base:`` / ``defaults:``), ``jaxeff config show|fields``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jaxeff.cli import main
from jaxeff.config import ExperimentConfig, load_config
from jaxeff.config_fields import changed_keys, field_rows
from jaxeff.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_depth_first_and_overrides_apply_last(tmp_path):
    _write(tmp_path / "root.yaml", "name: root\nmodel: {d_model: 64, n_layers: 2, n_heads: 2}\noptim: {lr: 0.01}\n")
    _write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nname: mid\nmodel: {n_layers: 3}\n")
    leaf = _write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\nname: leaf\noptim: {warmup_steps: 5}\n")
    cfg = load_config(leaf, ["model.n_layers=5"])
    assert cfg.name == "leaf"
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 2)  # from root, two levels up
    assert cfg.model.n_layers == 5  # root 2 -> mid 3 -> override 5
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (0.01, 5)  # sections merge key by key


def test_defaults_list_merges_in_order(tmp_path):
    _write(tmp_path / "a.yaml", "optim: {lr: 0.1, warmup_steps: 3}\n")
    _write(tmp_path / "b.yaml", "optim: {lr: 0.2}\ntrain: {steps: 7}\n")
    top = _write(tmp_path / "top.yaml", "defaults: [a.yaml, b.yaml]\ntrain: {steps: 9}\n")
    cfg = load_config(top)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps) == (0.2, 3, 9)


def test_cycle_and_missing_base_are_one_line(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="base cycle") as e:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)
    _write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base 'nowhere.yaml' does not exist"):
        load_config(tmp_path / "c.yaml")
    _write(tmp_path / "d.yaml", "base: 3\n")
    with pytest.raises(ConfigError, match="base: expected a relative path"):
        load_config(tmp_path / "d.yaml")


def test_converted_configs_resolve_to_their_full_settings():
    """The TTT and pruning configs use base: and keep the settings they spelled out before."""
    ttt = load_config(REPO / "configs/ttt/ttt_e2e_matched.yaml")
    assert ttt.name == "ttt_e2e_matched" and ttt.method == "ttt_e2e"
    assert ttt.model.sliding_window == 64 and ttt.ttt.match_params and ttt.ttt.mini_batch == 16
    assert (ttt.data.domains, ttt.data.seq_len, ttt.data.batch_size) == (("prose", "recall"), 512, 8)
    bigram = load_config(REPO / "configs/ttt/toy_bigram.yaml")
    assert bigram.ttt.inner_lr == 0.0 and bigram.ttt.fast_layers == (1,) and bigram.ttt.mini_batch == 256
    dyn = load_config(REPO / "configs/prune/continue_dynamic.yaml")
    assert (dyn.model.d_model, dyn.model.head_dim, dyn.optim.lr, dyn.train.steps) == (96, 32, 1e-3, 200)
    assert dyn.data.dynamic.enabled and dyn.train.init_from == "runs/sheared"
    shear = load_config(REPO / "configs/prune/shear.yaml")
    assert shear.optim.weight_decay == 0.0 and shear.optim.schedule == "constant"
    for path in [*REPO.glob("configs/ttt/*.yaml"), *REPO.glob("configs/prune/*.yaml")]:
        text = path.read_text()
        assert "base:" in text or path.name in ("full_attention.yaml", "toy_full_attention.yaml"), path


def test_config_show_prints_the_resolved_yaml(capsys):
    assert main(["config", "show", str(REPO / "configs/ttt/window_only.yaml"), "train.steps=12"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["sliding_window"] == 64 and shown["train"]["steps"] == 12 and "base" not in shown
    assert load_config(None, []).to_dict().keys() == shown.keys()
    assert main(["config", "show", "--changed", str(REPO / "configs/ttt/window_only.yaml")]) == 0
    changed = yaml.safe_load(capsys.readouterr().out)
    assert changed["model"]["sliding_window"] == 64 and "mesh" not in changed


def test_config_fields_lists_every_key_with_type_default_help(capsys):
    rows = field_rows(ExperimentConfig)
    keys = {r[0] for r in rows}
    assert {"optim.lr", "model.d_model", "quant.convert.format", "data.dynamic.enabled"} <= keys
    lr = next(r for r in rows if r[0] == "optim.grad_clip")
    assert lr[1] == "float | None" and lr[2] == "1.0" and "clipping" in lr[3]
    assert next(r for r in rows if r[0] == "model.d_model")[2] == "256"
    assert main(["config", "fields", "optim"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("optim.") for line in out)
    assert main(["config", "fields", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope' is not a section" in err


def test_changed_keys():
    assert changed_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 0}, "d": 3}) == {"a": {"c": 2}}


def test_config_show_bad_input_is_one_line_exit_2(tmp_path, capsys):
    _write(tmp_path / "a.yaml", "base: a.yaml\n")
    for argv, expected in (
        (["config", "show", str(tmp_path / "nope.yaml")], "does not exist"),
        (["config", "show", str(tmp_path / "a.yaml")], "base cycle"),
        (["config", "show", str(REPO / "configs/quickstart.yaml"), "model.nope=1"], "model.nope: unknown key"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
