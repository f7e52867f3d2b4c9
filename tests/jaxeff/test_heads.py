"""Head-importance pruning (Michel et al. 2019): the gate gradient, iterative pruning, extraction to a
smaller dense model (GQA with padding) and the ``jaxeff prune-heads`` CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.cli import main
from jaxeff.errors import ConfigError, JaxeffError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.prune.heads import HeadScorer, batch_loss, fold_heads, gate_gradients, iterative_prune

GQA = TransformerConfig(vocab_size=40, d_model=24, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=48, max_seq_len=32, init_std=0.2)
MHA = TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, init_std=0.2, use_bias=True)


def _batch(seed=0, b=3, t=12, vocab=40):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    mask[-1, 5:] = 0  # a row with padding at the end
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": (mask > 0).astype(np.int32),
        "loss_mask": mask,
    }


@pytest.fixture(scope="module")
def gqa():
    model = Transformer(GQA)
    return model, init_params(model, jax.random.key(0))


def test_gate_gradient_of_each_sequence_equals_a_finite_difference_of_its_loss(gqa):
    model, params = gqa
    batch = _batch()
    gates = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.0, (GQA.n_layers, GQA.n_heads)), jnp.float32)
    grads, n = gate_gradients(model, params, gates, batch)
    assert grads.shape == (3, GQA.n_layers, GQA.n_heads) and np.all(np.isfinite(grads))
    assert float(jnp.abs(grads).max()) > 1e-3  # the gates matter
    eps = 1e-2
    mean_loss = jax.jit(lambda g, b: (lambda s, c: s / c)(*batch_loss(model, params, g, b)))
    for row in range(3):
        one = {k: v[row : row + 1] for k, v in batch.items()}

        def loss(g):
            return float(mean_loss(g, one))

        for l, h in [(0, 0), (1, 4), (2, 5)]:
            d = jnp.zeros_like(gates).at[l, h].set(eps)
            fd = (loss(gates + d) - loss(gates - d)) / (2 * eps)
            np.testing.assert_allclose(float(grads[row, l, h]), fd, rtol=2e-2, atol=2e-4)
        # a random direction through all gates at once
        d = jnp.asarray(np.random.default_rng(row).normal(size=gates.shape), jnp.float32) * eps
        fd = (loss(gates + d) - loss(gates - d)) / 2
        np.testing.assert_allclose(float(jnp.sum(grads[row] * d)), fd, rtol=2e-2, atol=2e-4)


def test_importance_is_the_mean_absolute_gradient_normalised_per_layer(gqa):
    model, params = gqa
    batches = [_batch(0), _batch(1)]
    ones = np.ones((GQA.n_layers, GQA.n_heads), np.float32)
    scorer = HeadScorer(model, params)
    raw = scorer.importance(ones, batches, normalize=False)
    want = np.mean(np.concatenate([np.abs(np.asarray(gate_gradients(model, params, jnp.asarray(ones), b)[0])) for b in batches]), axis=0)
    np.testing.assert_allclose(raw, want, rtol=1e-5)
    imp = scorer.importance(ones, batches)
    np.testing.assert_allclose(np.linalg.norm(imp, axis=-1), 1.0, rtol=1e-6)


def _compare(model, params, cfg, gates, batch):
    small_params, small_cfg, info = fold_heads(params, cfg, gates)
    want = model.apply({"params": params}, jnp.asarray(batch["inputs"]), masks={"head": jnp.asarray(gates)}).logits
    got = Transformer(small_cfg).apply({"params": small_params}, jnp.asarray(batch["inputs"])).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    return small_cfg, info, small_params


def test_extracted_gqa_model_equals_the_gated_model_with_padding_heads(gqa):
    model, params = gqa
    gates = np.ones((3, 6), np.float32)
    gates[0, [0, 1, 2]] = 0  # layer 0: kv group 0 gone entirely; group 1 keeps 3
    gates[1, [1, 4, 5]] = 0  # layer 1: 2 + 1 heads in two groups
    gates[2, [0, 2, 3, 4]] = 0  # layer 2: 1 + 1
    small_cfg, info, _ = _compare(model, params, GQA, gates, _batch())
    # most groups kept: 2 (layers 1, 2); most heads in one kept group: 3 (layer 0)
    assert (small_cfg.n_kv_heads, small_cfg.n_heads, small_cfg.head_dim) == (2, 6, GQA.hd)
    assert info["kept_heads_per_layer"] == [3, 3, 2] and info["padding_heads"] == 3 * 6 - 8


def test_uniform_pruning_extracts_a_smaller_model_without_padding(gqa):
    model, params = gqa
    gates = np.ones((3, 6), np.float32)
    gates[:, [1, 4]] = 0  # one query head of each group in every layer
    small_cfg, info, small_params = _compare(model, params, GQA, gates, _batch(2))
    assert (small_cfg.n_kv_heads, small_cfg.n_heads, info["padding_heads"]) == (2, 4, 0)
    assert small_params["layers_0"]["attn"]["q"]["kernel"].shape == (24, 4 * GQA.hd)


def test_extracted_mha_model_with_biases_equals_the_gated_model():
    model = Transformer(MHA)
    params = init_params(model, jax.random.key(3))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape), params)  # non-zero biases
    gates = np.array([[1, 0, 0, 1], [0, 0, 1, 0]], np.float32)
    small_cfg, info, _ = _compare(model, params, MHA, gates, _batch(5))
    assert small_cfg.n_heads == 2 and small_cfg.n_kv_heads is None and info["padding_heads"] == 1


def test_fold_refuses_all_heads_pruned_or_soft_gates(gqa):
    _, params = gqa
    with pytest.raises(JaxeffError, match="every head is pruned"):
        fold_heads(params, GQA, np.zeros((3, 6)))
    with pytest.raises(JaxeffError, match="values 0"):
        fold_heads(params, GQA, np.full((3, 6), 0.5))
    with pytest.raises(JaxeffError, match="shape"):
        fold_heads(params, GQA, np.ones((2, 6)))


def test_iterative_pruning_removes_the_least_important_head_each_step(gqa):
    model, params = gqa
    scorer = HeadScorer(model, params)
    batches = [_batch(0)]
    gates, hist = iterative_prune(scorer, (3, 6), batches, batches, fraction=0.5, step_fraction=1 / 18)
    assert [h["pruned"] for h in hist] == list(range(10)) and gates.sum() == 9
    first = scorer.importance(np.ones((3, 6), np.float32), batches)
    g1, _ = iterative_prune(scorer, (3, 6), batches, batches, fraction=1 / 18, step_fraction=1 / 18)
    assert np.argmin(g1.reshape(-1)) == np.argmin(first.reshape(-1))
    np.testing.assert_allclose(hist[-1]["loss"], scorer.loss(gates, batches), rtol=1e-6)
    r1, _ = iterative_prune(scorer, (3, 6), batches, batches, fraction=0.5, order="random", seed=7)
    r2, _ = iterative_prune(scorer, (3, 6), batches, batches, fraction=0.5, order="random", seed=7)
    np.testing.assert_array_equal(r1, r2)
    assert r1.sum() == 9
    with pytest.raises(ConfigError, match="--order"):
        iterative_prune(scorer, (3, 6), batches, batches, fraction=0.5, order="magnitude")


@pytest.mark.parametrize("order", ["importance", "random"])
def test_group_balanced_pruning_takes_the_same_count_from_every_kv_group_and_extracts_without_padding(gqa, order):
    model, params = gqa
    scorer = HeadScorer(model, params)
    batches = [_batch(0)]
    gates, hist = iterative_prune(scorer, (3, 6), batches, batches, fraction=0.6, order=order, balance="group", kv_heads=2)
    per_group = gates.reshape(3, 2, 3).sum(-1)
    assert (per_group == 1).all() and [h["pruned"] for h in hist] == [0, 6, 12]  # round(0.6 * 3) = 2 of 3 per group
    small_cfg, info, _ = _compare(model, params, GQA, gates, _batch(4))
    assert (small_cfg.n_kv_heads, small_cfg.n_heads, info["padding_heads"]) == (2, 2, 0)
    # without GQA the unit is the layer
    mha = Transformer(MHA)
    g2, _ = iterative_prune(
        HeadScorer(mha, init_params(mha, jax.random.key(1))), (2, 4), [_batch(0)], [_batch(0)], fraction=0.5, order=order, balance="group", kv_heads=None
    )
    assert (g2.sum(-1) == 2).all()


def test_prune_heads_cli_writes_a_smaller_run_that_eval_reads(tiny_config, tmp_path, capsys):
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    cfg = tiny_config()
    src = Checkpointer(cfg.checkpoint_path)  # a source run at its random initialisation
    src.save(0, Trainer(cfg, devices=jax.devices()[:1]).init_state(), data_state={}, config=cfg.to_dict())
    src.close()
    out = tmp_path / "runs" / "tiny_heads"
    rc = main(["prune-heads", str(cfg.run_path), "--fraction", "0.5", "--out", str(out), "--batches", "1", "--step-fraction", "0.25"])
    text = capsys.readouterr().out
    assert rc == 0 and "| heads pruned |" in text
    rec = json.loads((out / "heads.json").read_text())
    total = cfg.model.n_layers * cfg.model.n_heads
    assert rec["history"][-1]["pruned"] == round(0.5 * total) and np.sum(rec["gates"]) == total - round(0.5 * total)
    # the extracted model's loss equals the gated model's after the last step
    np.testing.assert_allclose(rec["extracted_loss"], rec["history"][-1]["loss"], rtol=1e-4)
    assert rec["params_after"] <= rec["params_before"]
    assert main(["eval", str(out / "config.yaml"), "--checkpoint", str(out)]) == 0
    assert "eval/loss" in capsys.readouterr().out
    # the same --out again is refused
    assert main(["prune-heads", str(cfg.run_path), "--fraction", "0.5", "--out", str(out)]) == 2


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--fraction", "1.0"], "--fraction: expected a number in [0, 1)"),
        (["--fraction", "abc"], "--fraction: expected a number"),
        (["--fraction", "0.5", "--order", "magnitude"], "--order"),
        (["--fraction", "0.5", "--batches", "0"], "--batches: expected a positive integer"),
        (["--fraction", "0.5", "--balance", "layer"], "--balance: expected global or group"),
        (["--fraction", "0.5"], "does not exist"),
    ],
)
def test_prune_heads_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, msg):
    rc = main(["prune-heads", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
