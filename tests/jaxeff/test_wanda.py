"""Magnitude / Wanda pruning: exact per-output-unit sparsity, N:M patterns, the Wanda score, the
run-folder round trip and the ``jaxeff sparsify`` CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxeff.cli import main
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.prune.wanda import input_norms, keep_mask, magnitude_scores, parse_nm, prune, target_paths, wanda, wanda_scores
from jaxeff.quant.ptq import collect_dense_inputs

CFG = TransformerConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CFG)
    return model, init_params(model, jax.random.key(0))


def _batches(n=2, shape=(2, 16)):
    return [jax.random.randint(jax.random.key(10 + i), shape, 0, 264) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("sparsity,d_in", [(0.5, 16), (0.3, 10), (0.7, 7), (0.0, 8)])
def test_unstructured_prunes_exactly_floor_sparsity_times_in_of_every_output_unit(sparsity, d_in):
    scores = jax.random.uniform(jax.random.key(1), (d_in, 5))
    keep = np.asarray(keep_mask(scores, sparsity=sparsity))
    pruned_per_col = (~keep).sum(axis=0)
    assert (pruned_per_col == int(np.floor(sparsity * d_in))).all()
    # the pruned ones are the lowest scores of their column
    s = np.asarray(scores)
    for j in range(5):
        if (~keep[:, j]).any():
            assert s[~keep[:, j], j].max() < s[keep[:, j], j].min()


def test_exact_count_per_output_unit_holds_with_tied_scores():
    scores = jnp.ones((8, 3)).at[:, 1].set(jnp.array([1, 1, 0, 0, 0, 0, 2, 2]))
    keep = np.asarray(keep_mask(scores, sparsity=0.5))
    assert ((~keep).sum(axis=0) == 4).all()
    np.testing.assert_array_equal(keep[:, 0], [False] * 4 + [True] * 4)  # ties: lower input index pruned first
    np.testing.assert_array_equal(keep[:, 1], [True, True, False, False, False, False, True, True])


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8), (4, 4)])
def test_nm_keeps_the_n_highest_of_every_m_consecutive_inputs_per_output_unit(nm):
    n, m = nm
    scores = np.asarray(jax.random.uniform(jax.random.key(2), (16, 6)))
    keep = np.asarray(keep_mask(jnp.asarray(scores), nm=nm))
    groups_keep = keep.reshape(16 // m, m, 6)
    assert (groups_keep.sum(axis=1) == n).all()
    groups = scores.reshape(16 // m, m, 6)
    top = np.sort(groups, axis=1)[:, m - n :, :]
    np.testing.assert_array_equal(np.sort(np.where(groups_keep, groups, -1), axis=1)[:, m - n :, :], top)


def test_wanda_prunes_large_weights_on_quiet_inputs_where_magnitude_does_not():
    # one output unit, four inputs: W = (4, 3, 2, 1), input norms (0.1, 1, 10, 100)
    w = jnp.array([[4.0], [3.0], [2.0], [1.0]])
    norms = jnp.array([0.1, 1.0, 10.0, 100.0])
    np.testing.assert_allclose(np.asarray(wanda_scores(w, norms))[:, 0], [0.4, 3.0, 20.0, 100.0], rtol=1e-6)
    by_wanda = np.asarray(keep_mask(wanda_scores(w, norms), sparsity=0.5))[:, 0]
    by_magnitude = np.asarray(keep_mask(magnitude_scores(w), sparsity=0.5))[:, 0]
    np.testing.assert_array_equal(by_wanda, [False, False, True, True])
    np.testing.assert_array_equal(by_magnitude, [True, True, False, False])
    # negative weights score by their absolute value
    np.testing.assert_allclose(np.asarray(wanda_scores(-w, norms)), np.asarray(wanda_scores(w, norms)))


# ------------------------------------------------------------------------------------------------
# parameter trees


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruned_weights_are_zero_and_every_other_value_is_unchanged(model_and_params, method):
    model, params = model_and_params
    if method == "wanda":
        pruned, report = wanda(model, params, _batches(), sparsity=0.5)
    else:
        pruned, report = prune(params, method="magnitude", sparsity=0.5)
    before, after = _flat(params), _flat(pruned)
    targets = {p + "/kernel" for p in target_paths(params)}
    assert len(targets) == 14 and "embed/embedding" not in targets
    assert report["pruned_sparsity"] == 0.5
    for k, a in after.items():
        b = before[k]
        if k in targets:
            assert ((a == 0).sum(axis=0) == b.shape[0] // 2).all(), k
            np.testing.assert_array_equal(a[a != 0], b[a != 0])
            assert report["layers"][k[: -len("/kernel")]] == 0.5
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)  # embeddings (tied lm_head), norms untouched


def test_two_four_pattern_holds_in_every_block_projection(model_and_params):
    model, params = model_and_params
    pruned, report = wanda(model, params, _batches(), nm="2:4")
    for p in target_paths(params):
        k = np.asarray(pruned[p.split("/")[0]][p.split("/")[1]][p.split("/")[2]]["kernel"])
        assert ((k.reshape(k.shape[0] // 4, 4, -1) != 0).sum(axis=1) <= 2).all(), p
    assert report["pruned_sparsity"] == 0.5


def test_input_norms_are_the_l2_norm_over_non_padding_tokens(model_and_params):
    model, params = model_and_params
    tokens = _batches(1)[0]
    seg = np.ones(tokens.shape, np.int32)
    seg[1, 10:] = 0  # padding: left out
    batch = {"inputs": tokens, "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)), "segment_ids": seg}
    norms = input_norms(model, params, [batch, batch], ["layers_1/mlp/down", "layers_0/attn/q"])
    xs = collect_dense_inputs(model, params, tokens, r"layers_1/mlp/down|layers_0/attn/q")
    for path in ("layers_1/mlp/down", "layers_0/attn/q"):
        x = np.asarray(xs[path], np.float64)[seg > 0]  # [tokens, in]
        np.testing.assert_allclose(np.asarray(norms[path]), np.sqrt(2 * (x**2).sum(axis=0)), rtol=1e-4)


def test_sequential_wanda_measures_each_block_with_the_earlier_blocks_pruned(model_and_params):
    model, params = model_and_params
    batches = _batches()
    seq, _ = wanda(model, params, batches, sparsity=0.5, sequential=True)
    one_shot, _ = wanda(model, params, batches, sparsity=0.5, sequential=False)
    f_seq, f_one = _flat(seq), _flat(one_shot)
    for k in f_seq:  # block 0 sees the same inputs either way
        if k.startswith("layers_0/"):
            np.testing.assert_array_equal(f_seq[k], f_one[k])
    # block 1: norms measured on the model whose block 0 is pruned
    l0 = {**params, "layers_0": seq["layers_0"]}
    paths = [p for p in target_paths(params) if p.startswith("layers_1/")]
    expected, _ = prune(l0, method="wanda", sparsity=0.5, norms=input_norms(model, l0, batches, paths), pattern=r"^layers_1/")
    np.testing.assert_array_equal(_flat(seq)["layers_1/mlp/down/kernel"], _flat(expected)["layers_1/mlp/down/kernel"])
    assert any((f_seq[k] != f_one[k]).any() for k in f_seq if k.startswith("layers_1/"))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"method": "magnitude", "sparsity": 1.0}, "sparsity"),
        ({"method": "magnitude", "sparsity": -0.1}, "sparsity"),
        ({"method": "magnitude", "nm": "4:2"}, "nm: N must not exceed M"),
        ({"method": "magnitude", "nm": "2-4"}, "nm: expected N:M"),
        ({"method": "magnitude", "nm": "2:5"}, "nm: M=5 does not divide"),
        ({"method": "magnitude", "sparsity": 0.5, "nm": "2:4"}, "give exactly one"),
        ({"method": "random", "sparsity": 0.5}, "method"),
    ],
)
def test_bad_arguments_are_config_errors_naming_the_field(model_and_params, kwargs, field):
    _, params = model_and_params
    with pytest.raises(ConfigError, match=field):
        prune(params, **kwargs)


def test_parse_nm_reads_n_of_m():
    assert parse_nm("2:4") == (2, 4) and parse_nm((1, 8)) == (1, 8)


# ------------------------------------------------------------------------------------------------
# run folders and the CLI


def test_sparsify_cli_writes_a_run_that_eval_and_init_from_read(tiny_config, tmp_path, capsys):
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir
    from jaxeff.train.loop import Trainer, load_params

    cfg = tiny_config()
    src = Checkpointer(cfg.checkpoint_path)  # a source run at its random initialisation (no training needed)
    src.save(0, Trainer(cfg, devices=jax.devices()[:1]).init_state(), data_state={}, config=cfg.to_dict())
    src.close()
    out = tmp_path / "runs" / "tiny_w24"
    rc = main(["sparsify", "--checkpoint", str(cfg.run_path), "--out", str(out), "--method", "wanda", "--nm", "2:4", "--calib-batches", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "sparsity of the pruned kernels   0.5000" in text and "eval/loss" in text
    rec = json.loads((out / "sparsify.json").read_text())
    assert rec["pruned_sparsity"] == 0.5 and rec["nm"] == "2:4" and rec["eval_after"]["eval/loss"] > 0
    pruned_cfg = tiny_config(["name=tiny_w24"])
    _, params = load_params(pruned_cfg, find_checkpoint_dir(out))
    k = np.asarray(params["layers_1"]["mlp"]["up"]["kernel"])
    assert ((k.reshape(-1, 4, k.shape[1]) != 0).sum(axis=1) <= 2).all()
    # train.init_from reads it like any run
    base = Trainer(tiny_config(["name=ft", f"train.init_from={out}"])).load_base_params(str(out))
    np.testing.assert_array_equal(np.asarray(base["layers_1"]["mlp"]["up"]["kernel"]), k)
    assert main(["eval", "--checkpoint", str(out), str(_write_cfg(tmp_path, cfg))]) == 0
    assert "eval/loss" in capsys.readouterr().out


def test_sparsify_reads_any_methods_run_through_its_model_params(tiny_config, tmp_path):
    """A lora run is pruned as the model it stands for: base + scale * A B merged (not its raw tree)."""
    from jaxeff.prune.wanda import sparsify_run
    from jaxeff.runs import load_model_params
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    cfg = tiny_config(["method=lora", "peft.rank=2"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state()
    keys = iter(jax.random.split(jax.random.key(3), 64))
    lora = jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape, x.dtype), state.params["lora"])  # B != 0
    state = state.replace(params={**state.params, "lora": lora})
    with Checkpointer(cfg.checkpoint_path) as ckpt:
        ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    _, merged = load_model_params(cfg.run_path)
    up = np.asarray(merged["layers_1"]["mlp"]["up"]["kernel"])
    assert not np.array_equal(up, np.asarray(state.params["model"]["layers_1"]["mlp"]["up"]["kernel"]))
    rec, dense, pruned = sparsify_run(cfg.run_path, tmp_path / "runs" / "lora_m50", method="magnitude", sparsity=0.5, evaluate=False, return_params=True)
    np.testing.assert_array_equal(np.asarray(dense["layers_1"]["mlp"]["up"]["kernel"]), up)
    k = np.asarray(pruned["layers_1"]["mlp"]["up"]["kernel"])
    kept = k != 0
    assert rec["pruned_sparsity"] == 0.5 and kept.mean() == 0.5
    np.testing.assert_array_equal(k[kept], up[kept])  # survivors are the merged weights


def _write_cfg(tmp_path, cfg):
    import yaml

    d = cfg.to_dict()
    d["name"] = "tiny_w24"
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--sparsity", "1.5"], "--sparsity: expected a number in [0, 1)"),
        (["--nm", "4:2"], "--nm: N must not exceed M"),
        (["--sparsity", "0.5", "--nm", "2:4"], "--sparsity / --nm: give exactly one"),
        (["--sparsity", "0.5", "--method", "obs"], "--method"),
    ],
)
def test_sparsify_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, msg):
    rc = main(["sparsify", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1


def test_output_error_is_zero_unpruned_and_one_for_an_all_zero_kernel(model_and_params):
    from jaxeff.prune.wanda import output_error

    model, params = model_and_params
    tokens = _batches(1)[0]
    zeroed = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if "layers_0/attn/q" in "/".join(k.key for k in p) else x, params)
    err = output_error(model, params, zeroed, tokens, ["layers_0/attn/q", "layers_1/mlp/up"])
    assert err["layers_1/mlp/up"] == 0.0 and abs(err["layers_0/attn/q"] - 1.0) < 1e-6
