"""TensorBoard that compares runs: hparams (what differs from the defaults + a fixed list) with the
final eval losses and headline numbers as metrics, train/ce for every method, train/perplexity only
for cross-entropy objectives, the compiled step's memory, perf/mfu on CPU, optional W&B."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import jax
import pytest

from jaxeff.config import ExperimentConfig
from jaxeff.train.logging import HPARAM_ALWAYS, objective_scalars, run_hparams


def _events(run: Path):
    """(scalar tags -> [(step, value)], hparams {name: value}, hparam metric tags) of a run folder."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    scalars, hparams, metrics = {}, {}, []
    for path in sorted(run.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(path)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        for k, x in data.session_start_info.hparams.items():
                            hparams[k] = getattr(x, x.WhichOneof("kind"))
                    if data.HasField("experiment"):
                        metrics = [m.name.tag for m in data.experiment.metric_infos]
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
                elif v.HasField("tensor"):  # the loader turns simple values into 0-d tensors
                    array = tensor_util.make_ndarray(v.tensor)
                    if array.ndim == 0 and array.dtype.kind == "f":
                        scalars.setdefault(v.tag, []).append((ev.step, float(array)))
    return scalars, hparams, metrics


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from jaxeff.config import load_config
    from jaxeff.train.loop import run_training
    from tests.conftest import TINY

    import yaml

    root = tmp_path_factory.mktemp("tb")
    cfg_file = root / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "logging": {"run_dir": str(root / "runs"), "progress": False}}))
    cfg = load_config(cfg_file, ["train.steps=4", "train.log_every=2", "train.eval_every=4", "checkpoint.every=4", "train.peak_flops=1e15"])
    result = run_training(cfg, devices=jax.devices()[:1])
    return cfg, result, _events(cfg.run_path)


def test_lm_run_scalars(lm_run, capsys):
    cfg, result, (scalars, _, _) = lm_run
    for tag in (
        "train/loss",
        "train/ce",
        "train/perplexity",
        "perf/mfu",
        "memory/argument_bytes",
        "memory/output_bytes",
        "memory/temp_bytes",
        "memory/step_total_bytes",
        "eval/loss",
    ):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/ce"]] == [2, 4]
    assert scalars["train/ce"] == scalars["train/loss"]  # lm: the loss is the cross-entropy
    assert all(0 < v < 1 for _, v in scalars["perf/mfu"])  # a 1 PFLOP/s peak set for a CPU: a small fraction, finite
    assert [s for s, _ in scalars["memory/temp_bytes"]] == [0] and scalars["memory/temp_bytes"][0][1] > 0
    assert not any(t.startswith("data/") for t in scalars)  # no single-point data series at the top level


def test_hparams_are_what_defines_the_run(lm_run):
    cfg, result, (scalars, hparams, metrics) = lm_run
    assert set(HPARAM_ALWAYS) <= set(hparams)
    assert hparams["method"] == "lm" and hparams["model.d_model"] == 32 and hparams["optim.lr"] == pytest.approx(3e-3)
    assert hparams["model.params"] == cfg.model.param_count()
    assert hparams["train.steps"] == 4 and hparams["data.seq_len"] == 32  # differs from the default 128
    assert "mesh.rules" not in hparams and "data.format" not in hparams and "logging.run_dir" not in hparams
    assert len(hparams) < 30  # not the ~140 flattened keys
    assert {"eval/loss", "eval/loss/arithmetic", "eval/loss/prose", "train/ce", "params/trainable_pct"} <= set(metrics)
    for tag in metrics:  # every metric is a series of the run (the table shows its last value)
        assert tag in scalars, tag
    assert scalars["eval/loss"][-1] == (4, pytest.approx(result["eval/loss"], rel=1e-6))


def test_run_hparams_keep_ints_as_ints():
    config = ExperimentConfig().to_dict()
    config["model"]["n_layers"] = 7
    config["data"]["domains"] = ["prose"]
    hp = run_hparams(config)
    assert isinstance(hp["model.n_layers"], int) and hp["model.n_layers"] == 7
    assert isinstance(hp["seed"], int) and isinstance(hp["train.steps"], int)
    assert hp["data.domains"] == '["prose"]'  # a list as text
    assert set(hp) == {*HPARAM_ALWAYS, "model.params", "data.domains"}
    assert list(hp)[: len(HPARAM_ALWAYS)] == list(HPARAM_ALWAYS)


def test_objective_scalars_per_method():
    lm = objective_scalars({"train/loss": 2.0})
    assert lm == {"train/ce": 2.0, "train/perplexity": pytest.approx(7.389056, rel=1e-6)}
    distill = objective_scalars({"train/loss": 0.3, "train/ce": 2.5, "train/kd": 0.1})
    assert distill == {}  # its own ce is kept; no perplexity of a KD objective
    shear = objective_scalars({"train/loss": -3.0, "train/shear/lm_loss": 2.2, "train/shear/expected_params": 120.0, "train/shear/target_params": 100.0})
    assert shear == {"train/ce": 2.2, "train/shear/params_ratio": pytest.approx(1.2)}
    ttt = objective_scalars({"train/loss": 2.0, "train/ttt/first_chunk_loss": 3.0, "train/ttt/last_chunk_loss": 2.5})
    assert ttt["train/ttt/gain"] == pytest.approx(0.5) and "train/perplexity" in ttt


class _FakeWandb(types.ModuleType):
    """Stands in for ``wandb`` (not installed here): records init / log / summary / finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            summary: dict = {}

            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        self.run = Run()
        self.run.summary = {}
        return self.run


def _logger(tmp_path, wandb_settings):
    from jaxeff.train.logging import RunLogger

    config = ExperimentConfig().to_dict()
    config["logging"]["wandb"] = wandb_settings
    return RunLogger(tmp_path / "run", config, total_steps=2, start_step=0, progress=False)


def test_wandb_logs_the_same_scalars(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = _logger(tmp_path, {"project": "p", "mode": "offline"})
    logger.scalars(1, {"train/loss": 2.0, "train/ce": 2.0})
    logger.scalars(2, {"eval/loss": 1.5})
    logger.finish()
    summary = fake.run.summary
    logger.close()
    assert fake.inits[0]["project"] == "p" and fake.inits[0]["mode"] == "offline"
    assert fake.inits[0]["config"]["logging"]["wandb"]["project"] == "p"
    assert fake.logged == [(1, {"train/loss": 2.0, "train/ce": 2.0}), (2, {"eval/loss": 1.5})]
    assert summary == {"eval/loss": 1.5, "train/ce": 2.0} and fake.finished == 1


def test_wandb_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    logger = _logger(tmp_path, {"project": "p"})
    logger.scalars(1, {"train/loss": 2.0})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb is not installed" in err


def test_flush_writes_every_point_logged_before_it(tmp_path):
    """RunLogger.flush (called before each checkpoint) leaves every point logged so far in the event
    file: tensorboardX's own flush does not wait for its background queue, so a point logged just
    before a checkpoint could be lost to a kill -9 right after it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jaxeff.train.logging import RunLogger

    logger = RunLogger(tmp_path / "run", {"name": "run"}, total_steps=300, start_step=0, progress=False)
    for step in range(1, 301):
        logger.scalars(step, {"train/loss": 1.0 / step, "train/grad_norm": float(step)})
    logger.flush()  # no close: the file as a kill -9 would leave it
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 301))
    assert [e.step for e in acc.Scalars("train/grad_norm")] == list(range(1, 301))
    logger.close()
