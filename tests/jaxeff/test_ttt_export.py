"""TTT-E2E runs and plain-model consumers: the fast MLPs are never dropped silently (Hugging Face
export and task-vector merges take ``Method.model_params``, which refuses for ttt_e2e)."""

import jax
import pytest
import yaml

from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, init_params
from jaxeff.train.methods import make_method
from jaxeff.ttt import has_fast_weights, refuse_fast_weights
from jaxeff.ttt.model import TTTSpec, add_fast_params

BASE = ["method=ttt_e2e", "model.n_layers=2", "model.sliding_window=8", "ttt.mini_batch=4", "data.seq_len=16"]


def _params(cfg):
    spec = TTTSpec.from_config(cfg)
    base = init_params(Transformer(cfg.model), jax.random.PRNGKey(0))
    return base, add_fast_params(spec, base, jax.random.PRNGKey(1))


def test_has_fast_weights_tells_a_ttt_tree_from_a_plain_model(tiny_config):
    cfg = tiny_config(BASE)
    base, params = _params(cfg)
    assert has_fast_weights(params)
    assert not has_fast_weights(base) and not has_fast_weights({"model": base, "fast": {}})
    refuse_fast_weights(base, "--from")  # a plain tree passes
    with pytest.raises(ConfigError) as e:
        refuse_fast_weights(params, "--from")
    assert str(e.value).startswith("--from: a ttt_e2e run has fast MLPs (blocks 1)") and "\n" not in str(e.value)


def test_ttt_model_params_refuse_instead_of_dropping_the_fast_mlps(tiny_config):
    cfg = tiny_config(BASE)
    _, params = _params(cfg)
    method = make_method(cfg, Transformer(cfg.model))
    with pytest.raises(ConfigError) as e:
        method.model_params(params)
    assert str(e.value).startswith("method: a ttt_e2e run has fast MLPs") and "\n" not in str(e.value)


@pytest.mark.slow
def test_convert_to_hf_of_a_ttt_run_exits_2_and_writes_nothing(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main

    raw = tiny_config(BASE + ["train.steps=1", "train.eval_every=1", "checkpoint.every=1", "data.docs_per_domain=8"]).to_dict()
    path = tmp_path / "ttt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "hf"
    assert main(["convert", "--from", str(tmp_path / "runs" / "tiny"), "--to-hf", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method: a ttt_e2e run has fast MLPs"), err
    assert not out.exists()
