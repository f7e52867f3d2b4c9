"""One Dense-targeting rule for peft, quant, wanda and lottery (jaxeff.targets)."""

import re

import jax
import pytest

from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.peft.config import PeftConfig
from jaxeff.peft.lora import target_paths as lora_targets
from jaxeff.prune.wanda import TARGETS, target_paths as wanda_targets
from jaxeff.quant.config import QuantConfig
from jaxeff.quant.intercept import dense_paths
from jaxeff.targets import BLOCK_LAYERS, BLOCK_PROJECTIONS, dense_modules, resolve_kernel_backend, select


@pytest.fixture(scope="module")
def params():
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16, tie_embeddings=False)
    return init_params(Transformer(cfg), jax.random.PRNGKey(0))


def test_every_family_selects_the_block_projections_by_default(params):
    expected = [f"layers_{i}/{m}" for i in range(2) for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")]
    assert "lm_head" in dense_modules(params)  # untied: a Dense the defaults leave alone
    assert sorted(select(params, BLOCK_PROJECTIONS, "t")) == sorted(expected)
    assert sorted("/".join(p) for p in lora_targets(params, PeftConfig().targets)) == sorted(expected)
    assert sorted(dense_paths(params, QuantConfig().weight_layers)) == sorted(expected)
    assert sorted(wanda_targets(params, TARGETS)) == sorted(expected)
    assert sorted(select(params, BLOCK_LAYERS, "t")) == sorted(expected)


def test_rules_match_the_whole_path(params):
    assert select(params, r"layers_0/attn/q", "t") == ["layers_0/attn/q"]
    assert select(params, [r"layers_1/mlp/down", r"lm_head"], "t") == ["layers_1/mlp/down", "lm_head"]
    # full match, not search: the "attn/o" alternative matches no whole path (a search would take both o's)
    assert select(params, r"layers_1/mlp/up|attn/o", "t") == ["layers_1/mlp/up"]


def test_an_old_search_rule_still_selects_with_one_deprecation_line(params, capsys):
    old = r"^layers_\d+/(attn|mlp)/"  # the quant default before rules matched whole paths
    assert sorted(select(params, old, "quant.weight_layers")) == sorted(select(params, BLOCK_LAYERS, "t"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quant.weight_layers" in err and "deprecated" in err


def test_a_rule_selecting_nothing_or_malformed_is_one_line_naming_the_key(params):
    with pytest.raises(ConfigError, match=re.escape("peft.targets: ['nothing'] match no Dense layer")):
        lora_targets(params, ["nothing"])
    with pytest.raises(ConfigError, match="prune targets: '\\(\\(' is not a valid regex"):
        wanda_targets(params, "((")
    assert select(params, "nothing", "quant.weight_layers") == []  # optional: quantize nothing


def test_auto_backend_means_the_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_kernel_backend("auto") == "reference"
    assert resolve_kernel_backend("interpret") == "interpret"
