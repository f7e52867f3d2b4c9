"""The method registry: a method is one file (its config section + factory), the experiment schema is
built from the registry, and an outside module joins through JAXEFF_METHOD_MODULES."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from pydantic import Field

from jaxeff.config import experiment_schema
from jaxeff.errors import ConfigError
from jaxeff.schema import Section
from jaxeff.train.methods import method_names, method_sections, register_method
from jaxeff.train.runtime import Trainer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "label_smoothing.py"


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Methods registered here leave the registry (and the schema) as they found it."""
    from jaxeff.train import methods

    method_names()  # the built-ins loaded first, so the snapshot has them
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    monkeypatch.setattr(methods, "_SECTIONS", dict(methods._SECTIONS))


def _load_example():
    spec = importlib.util.spec_from_file_location("label_smoothing", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builtin_sections_come_from_the_registry():
    sections = method_sections()
    assert {"distill", "peft", "quant", "prune", "ttt"} <= set(sections)
    fields = experiment_schema().model_fields
    for key, cls in sections.items():
        assert fields[key].annotation is cls
    assert {"lm", "distill", "lora", "qlora", "bitfit", "qat", "quantized", "shear", "ttt_e2e"} <= set(method_names())


def test_a_method_file_adds_its_section_and_its_name_to_the_schema(tiny_config):
    _load_example()
    cfg = tiny_config(["method=label_smoothing", "label_smoothing.epsilon=0.2"])
    assert cfg.method == "label_smoothing" and cfg.label_smoothing.epsilon == 0.2
    assert "label_smoothing" in cfg.to_dict()
    with pytest.raises(ConfigError, match=r"label_smoothing\.epsilon"):
        tiny_config(["method=label_smoothing", "label_smoothing.epsilon=2"])
    with pytest.raises(ConfigError, match=r"label_smoothing\.bogus: unknown key"):
        tiny_config(["label_smoothing.bogus=1"])
    with pytest.raises(ConfigError, match=r"method: unknown method 'nope' \(expected one of .*label_smoothing"):
        tiny_config(["method=nope"])


def test_the_example_method_trains_and_with_no_smoothing_is_the_lm_loss(tiny_config):
    _load_example()
    from jaxeff.models import Transformer, init_params
    from jaxeff.train.inputs import build_data
    from jaxeff.train.methods import make_method

    cfg = tiny_config(["mesh.data=1"])
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    batch = loader.next_batch()
    model = Transformer(cfg.model)
    params = init_params(model, jax.random.PRNGKey(0))
    losses = {}
    for eps in (None, 0.0, 0.3):
        c = cfg if eps is None else tiny_config(["mesh.data=1", "method=label_smoothing", f"label_smoothing.epsilon={eps}"])
        value, _ = make_method(c, model).loss(params, batch, jax.random.PRNGKey(1), frozen=None, deterministic=True)
        losses[eps] = float(value)
    assert np.isfinite(list(losses.values())).all()
    assert losses[0.0] == pytest.approx(losses[None], rel=1e-5)  # no smoothing: the lm method's CE
    assert losses[0.3] > losses[None] + 1e-3  # smoothing raises the CE of a near-uniform model


def test_the_example_method_runs_one_sharded_step(tiny_config):
    _load_example()
    from jaxeff.train.inputs import build_data

    cfg = tiny_config(["method=label_smoothing"])
    t = Trainer(cfg)
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    state, m = t.train_step(t.init_state(), loader.next_batch())
    assert np.isfinite(float(m["loss"])) and float(m["smoothing"]) == pytest.approx(0.1)


def test_two_methods_share_a_section_but_not_two_classes_one_key():
    class A(Section):
        x: int = Field(1)

    class B(Section):
        y: int = 2

    register_method("test_shared_a", config=A, section="test_shared")(lambda cfg, model: None)
    register_method("test_shared_b", config=A, section="test_shared")(lambda cfg, model: None)
    with pytest.raises(ValueError, match="section 'test_shared' is already A"):
        register_method("test_shared_c", config=B, section="test_shared")(lambda cfg, model: None)
    assert experiment_schema()().model_dump()["test_shared"] == {"x": 1}


def test_the_environment_variable_brings_in_a_method_module_for_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parent), "JAXEFF_METHOD_MODULES": "label_smoothing"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "jaxeff"), "config", "fields", "label_smoothing"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "label_smoothing.epsilon" in out.stdout
    bad = {**env, "JAXEFF_METHOD_MODULES": "no_such_module_xyz"}
    out = subprocess.run([str(Path(sys.executable).parent / "jaxeff"), "config", "fields", "optim"], env=bad, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "JAXEFF_METHOD_MODULES: cannot import method module 'no_such_module_xyz'" in out.stderr
