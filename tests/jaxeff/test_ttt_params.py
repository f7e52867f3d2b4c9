"""TTT-E2E with ``ttt.match_params``: the fast blocks' regular MLPs shrink so that the model has the
parameter count of the same model without TTT, as closely as integer widths allow."""

import jax
import numpy as np
import pytest

from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, init_params
from jaxeff.ttt.method import evaluate_logits
from jaxeff.ttt.model import TTTSpec, add_fast_params

BASE = ["method=ttt_e2e", "model.n_layers=4", "model.sliding_window=8", "ttt.mini_batch=4", "data.seq_len=16"]


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _trees(cfg):
    spec = TTTSpec.from_config(cfg)
    base = jax.eval_shape(lambda: init_params(Transformer(cfg.model), jax.random.PRNGKey(0)))
    ttt = jax.eval_shape(lambda b: add_fast_params(spec, b, jax.random.PRNGKey(1)), base)
    if not spec.use_attention:  # the same model without TTT has no attention either
        base = {k: {kk: vv for kk, vv in v.items() if kk not in ("attn", "attn_norm")} if k.startswith("layers_") else v for k, v in base.items()}
    return spec, _count(base), _count(ttt)


@pytest.mark.parametrize(
    "extra",
    [[], ["ttt.fast_layers=[1,2,3]"], ["ttt.fast_d_ff=40"], ["model.use_bias=true"], ["ttt.attention=none", "model.sliding_window=null"]],
    ids=["default", "three_fast_blocks", "fixed_fast_width", "biases", "no_attention"],
)
def test_matched_model_has_the_baseline_parameter_count_up_to_the_reported_residual(tiny_config, extra):
    cfg = tiny_config(BASE + ["ttt.match_params=true"] + extra)
    spec, base, ttt = _trees(cfg)
    assert ttt - base == spec.extra_params()  # the reported residual is the real difference
    d, n = cfg.model.d_model, len(spec.fast_layers)
    assert abs(ttt - base) <= n * d  # the two norm scales (2d) forbid 0; -d per fast block is the closest
    # and no other integer width does better: one unit wider or narrower regular MLPs
    unit = 3 * d + 2 * cfg.model.use_bias
    assert abs(ttt - base) <= min(abs(ttt - base + s * n * unit) for s in (-1, 1))
    if "ttt.fast_d_ff=40" in extra:
        assert spec.fast_d_ff == 40 and spec.block_d_ff == 64 - 40 - 1
    assert spec.block_d_ff < cfg.model.ff
    # unmatched, the count is the fast MLPs on top
    spec0, base0, ttt0 = _trees(tiny_config(BASE + extra))
    assert ttt0 - base0 == spec0.extra_params() == n * (3 * d * spec0.fast_d_ff + 2 * d) and spec0.block_d_ff is None


def test_matched_model_runs_with_its_narrower_mlps(tiny_config):
    cfg = tiny_config(BASE + ["ttt.match_params=true"])
    spec = TTTSpec.from_config(cfg)
    key = jax.random.PRNGKey(0)
    plain = init_params(Transformer(cfg.model), key)
    params = add_fast_params(spec, plain, jax.random.fold_in(key, 1))
    mlp = params["model"]["layers_3"]["mlp"]
    assert mlp["gate"]["kernel"].shape == (32, spec.block_d_ff) and mlp["down"]["kernel"].shape == (spec.block_d_ff, 32)
    # the fast blocks keep the first units of the initialised (or init_from) MLP; other blocks are untouched
    np.testing.assert_array_equal(mlp["down"]["kernel"], plain["layers_3"]["mlp"]["down"]["kernel"][: spec.block_d_ff])
    assert params["model"]["layers_2"]["mlp"]["gate"]["kernel"].shape == (32, 64)
    tokens = jax.random.randint(key, (2, 16), 3, 64)
    logits = jax.jit(evaluate_logits, static_argnums=(0,))(spec, params, tokens)
    assert logits.shape == (2, 16, cfg.model.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_unmatchable_parameter_count_is_a_one_line_error(tiny_config):
    with pytest.raises(ConfigError) as e:
        TTTSpec.from_config(tiny_config(BASE + ["ttt.match_params=true", "ttt.fast_d_ff=200"]))
    assert str(e.value).startswith("ttt.match_params: cannot match") and "\n" not in str(e.value)
