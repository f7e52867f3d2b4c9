"""Test set-up: 8 fake CPU devices (for sharding tests) before JAX initialises; GPU/TPU marks skip
when that hardware is absent."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "JAXEFF_TEST_DEVICE" not in os.environ:  # on a GPU machine: JAXEFF_TEST_DEVICE=gpu pytest -m gpu
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))


TINY = {
    "name": "tiny",
    "model": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64},
    "data": {"domains": ["arithmetic", "prose"], "docs_per_domain": 40, "eval_docs_per_domain": 4, "seq_len": 32, "batch_size": 8},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 6, "eval_every": 3, "eval_batches": 1, "log_every": 2},
    "checkpoint": {"every": 3, "keep": 5},
    "logging": {"progress": False},
}


@pytest.fixture
def tiny_config(tmp_path):
    """A tiny experiment config (dict) whose run folder lives in tmp_path; returns a builder
    ``make(overrides: list[str]) -> ExperimentConfig``."""
    import copy

    from jaxeff.config import from_dict, with_overrides

    def make(overrides=()):
        raw = copy.deepcopy(TINY)
        raw["logging"]["run_dir"] = str(tmp_path / "runs")
        return from_dict(with_overrides(raw, list(overrides)))

    return make
