"""Sheared-LLaMA pruning: hard-concrete masks, the masked model, the Lagrangian step, extraction."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.cli import main
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.models.transformer import RMSNorm
from jaxeff.prune import hard_concrete as hc
from jaxeff.prune.config import PruneConfig, pruned_sizes
from jaxeff.prune.extract import extract, extract_run, fold
from jaxeff.prune.shear import final_masks, init_shear, shear_optimizer, target_sparsity
from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.methods import make_method

TARGET = {"d_model": 24, "n_heads": 2, "n_layers": 2, "d_ff": 20}
# GQA (2 kv groups of 2 heads), tied embeddings, a per-layer window; and MHA, untied, with biases
GQA = TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32, sliding_window=(None, 8, None))
MHA = TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=32, tie_embeddings=False, use_bias=True)


def _tokens(seed=9, shape=(2, 16), vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@functools.cache
def _noisy_params(cfg, seed=0):
    """Random parameters with non-trivial norm scales and biases (fresh ones are 1 and 0)."""

    def make(key):
        params = init_params(Transformer(cfg), key)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    return jax.jit(make)(jax.random.key(seed))


@functools.cache
def _logits_fn(cfg):
    """Jitted ``(params, tokens, masks) -> logits`` (eager Flax is slow op by op)."""
    model = Transformer(cfg)
    return jax.jit(lambda params, tokens, masks=None: model.apply({"params": params}, tokens, masks=masks).logits)


def _shear_tree(cfg, target=TARGET, seed=2):
    """A ``shear`` parameter tree with spread-out log α (so the soft mask values differ from 1)."""
    pc = PruneConfig(target=target)
    sizes = pruned_sizes(pc, cfg)
    shear = init_shear(hc.mask_shapes(cfg, sizes), jax.random.key(1), pc)
    shear["log_alpha"] = {t: 2.0 * jax.random.normal(jax.random.key(seed + i), v.shape) for i, (t, v) in enumerate(sorted(shear["log_alpha"].items()))}
    return {"model": _noisy_params(cfg), "shear": shear}, pc, sizes


# ------------------------------------------------------------------------------------------------
# hard-concrete formulas


def test_hard_concrete_samples_lie_in_0_1_with_exact_zeros_and_ones_at_the_keep_probability():
    log_alpha = jnp.repeat(jnp.array([-2.0, 0.0, 1.0, 3.0]), 20000).reshape(4, 20000)
    z = np.asarray(hc.sample(log_alpha, jax.random.key(0)))
    assert z.min() == 0.0 and z.max() == 1.0
    assert np.all((z >= 0) & (z <= 1))
    assert 0 < np.mean((z > 0) & (z < 1)) < 1  # soft values in between too
    np.testing.assert_allclose((z > 0).mean(axis=1), np.asarray(hc.keep_prob(log_alpha[:, 0])), atol=0.015)


def test_keep_probability_is_one_minus_sigmoid_of_beta_ln_l_over_r_minus_log_alpha():
    la = np.array([-4.0, -1.0, 0.0, 0.5, 2.0, 4.6])
    expected = 1.0 - 1.0 / (1.0 + np.exp(-((2 / 3) * np.log(0.1 / 1.1) - la)))
    np.testing.assert_allclose(np.asarray(hc.keep_prob(jnp.asarray(la))), expected, rtol=1e-5)
    assert float(hc.keep_prob(jnp.float32((2 / 3) * math.log(0.1 / 1.1)))) == pytest.approx(0.5)
    assert float(hc.keep_prob(jnp.float32(100.0))) == pytest.approx(1 - 1e-6)  # clamped at 1 - ε


def test_deterministic_masks_keep_the_top_log_alpha_per_row_at_the_soft_value():
    la = jnp.array([[0.3, -1.0, 2.0, 0.1], [5.0, 4.0, -3.0, 4.5]])
    m = np.asarray(hc.deterministic(la, 2))
    np.testing.assert_array_equal(m != 0, [[True, False, True, False], [True, False, False, True]])
    np.testing.assert_allclose(m[m != 0], 1 / (1 + np.exp(-np.asarray(la)[m != 0] / (2 / 3) * 0.8)), rtol=1e-6)


def test_pruning_eval_is_deterministic_and_uses_exactly_the_target_counts(tiny_config):
    cfg = tiny_config(["method=shear", "prune.target.n_heads=2", "prune.target.d_ff=40", "prune.target.d_model=24"])
    model = Transformer(cfg.model)
    method = make_method(cfg, model)
    params = jax.jit(lambda k: method.prepare_params(init_params(model, k), jax.random.fold_in(k, 1)))(jax.random.key(0))
    sizes = pruned_sizes(cfg.prune, cfg.model)
    masks = final_masks(params["shear"], sizes)
    assert {t: int(np.count_nonzero(np.asarray(v), axis=-1).max()) for t, v in masks.items()} == {"head": 1, "intermediate": 40, "hidden": 24}
    x = _tokens(vocab=264)
    batch = {"inputs": x, "targets": x, "loss_mask": jnp.ones(x.shape), "positions": None, "segment_ids": None}
    loss = jax.jit(lambda rng, det: method.loss(params, batch, rng, frozen=None, deterministic=det, step=0)[0], static_argnums=1)
    assert float(loss(jax.random.key(1), True)) == float(loss(jax.random.key(2), True))
    assert float(loss(jax.random.key(1), False)) != float(loss(jax.random.key(2), False))  # training samples masks


# ------------------------------------------------------------------------------------------------
# the masked model


def test_masked_rmsnorm_averages_over_the_kept_features_only():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mask = jnp.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 2.0, 1.0])
    kept = np.flatnonzero(np.asarray(mask))
    norm = RMSNorm()
    params = {"params": {"scale": jnp.linspace(0.5, 1.5, 8)}}
    y = np.asarray(norm.apply(params, x, mask))
    sub = np.asarray(norm.apply({"params": {"scale": params["params"]["scale"][kept]}}, x[..., kept]))
    np.testing.assert_allclose(y[..., kept], sub * np.asarray(mask)[kept], rtol=1e-6)
    assert np.all(y[..., np.asarray(mask) == 0] == 0)


@pytest.mark.slow
def test_all_ones_masks_give_the_unmasked_logits():
    params = _noisy_params(GQA)
    ones = {"head": jnp.ones((3, 4)), "attn": jnp.ones(3), "mlp": jnp.ones(3), "intermediate": jnp.ones((3, 48)), "hidden": jnp.ones(32)}
    x = _tokens()
    np.testing.assert_allclose(_logits_fn(GQA)(params, x, ones), _logits_fn(GQA)(params, x), rtol=1e-5, atol=1e-5)


def _count_kept(model_cfg, params, masks):
    """Parameters whose every masked dimension is kept, counted leaf by leaf (0/1 masks); ``params``
    may be shapes only."""
    m = model_cfg
    g, hd = m.n_heads // m.kv_heads, m.hd
    ones = lambda *s: np.ones(s)
    zh = np.asarray(masks.get("hidden", ones(m.d_model)))
    zl = np.asarray(masks.get("layer", ones(m.n_layers)))
    zg = np.asarray(masks.get("head", ones(m.n_layers, m.kv_heads)))
    zi = np.asarray(masks.get("intermediate", ones(m.n_layers, m.ff)))
    total = 0
    for name, sub in params.items():
        if not name.startswith("layers_"):
            if name == "embed":
                total += int(np.outer(np.ones(m.vocab_size), zh).sum())
            elif name == "final_norm":
                total += int(zh.sum())
            else:
                total += int(np.outer(zh, np.ones(m.vocab_size)).sum()) + (math.prod(sub["bias"].shape) if "bias" in sub else 0)
            continue
        l = int(name.split("_")[1])
        q_heads = np.repeat(zg[l], g * hd)
        kv = np.repeat(zg[l], hd)
        cols = {"q": q_heads, "k": kv, "v": kv, "gate": zi[l], "up": zi[l]}
        for block, mods in sub.items():
            if block.endswith("_norm"):
                total += int(zl[l] * zh.sum())
                continue
            for mod, leaves in mods.items():
                for leaf, x in leaves.items():
                    if mod in cols:
                        kept = np.outer(zh, cols[mod]) if leaf == "kernel" else cols[mod]
                    else:  # o, down: [in, d_model]
                        rows = q_heads if mod == "o" else zi[l]
                        kept = np.outer(rows, zh) if leaf == "kernel" else zh
                    assert kept.shape == x.shape, (name, block, mod, leaf)
                    total += int(zl[l] * kept.sum())
    return total


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa_tied", "mha_untied_bias"])
def test_expected_params_equals_the_count_of_kept_parameters_for_hard_masks(cfg):
    shapes = jax.eval_shape(lambda: init_params(Transformer(cfg), jax.random.key(0)))
    rng = np.random.default_rng(0)
    for trial in range(4):
        masks = {
            "head": rng.random((3, cfg.kv_heads)) < 0.6,
            "intermediate": rng.random((3, 48)) < 0.5,
            "layer": rng.random(3) < 0.7,
            "hidden": rng.random(32) < 0.8,
        }
        masks = {t: v.astype(np.float32) for t, v in masks.items()}
        drop = list(masks)[trial]  # a missing mask type keeps everything
        masks.pop(drop)
        expected = float(hc.expected_params({t: jnp.asarray(v) for t, v in masks.items()}, cfg))
        assert expected == _count_kept(cfg, shapes, masks)
    assert float(hc.expected_params({}, cfg)) == cfg.param_count()


# ------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa_tied_window", "mha_untied_bias"])
def test_extracted_model_gives_the_masked_models_logits_and_has_the_target_shapes(cfg):
    full, pc, sizes = _shear_tree(cfg)
    masks = final_masks(full["shear"], sizes)
    assert any(0.05 < float(v) < 0.95 for m in masks.values() for v in np.asarray(m).ravel())  # soft values fold
    small, small_cfg = extract(full, cfg, pc)
    assert (small_cfg.d_model, small_cfg.n_heads, small_cfg.n_layers, small_cfg.d_ff) == (24, 2, 2, 20)
    assert small_cfg.head_dim == cfg.hd and small_cfg.kv_heads == (1 if cfg.n_kv_heads else 2)
    fresh = jax.eval_shape(lambda: init_params(Transformer(small_cfg), jax.random.key(0)))
    assert jax.tree.structure(small) == jax.tree.structure(fresh)
    assert jax.tree.map(lambda a: a.shape, small) == jax.tree.map(lambda a: a.shape, fresh)
    assert sum(x.size for x in jax.tree.leaves(small)) == small_cfg.param_count()
    hard = {t: (np.asarray(v) != 0).astype(np.float32) for t, v in masks.items()}
    assert float(hc.expected_params({t: jnp.asarray(v) for t, v in hard.items()}, cfg)) == small_cfg.param_count()
    x = _tokens()
    masked = _logits_fn(cfg)(full["model"], x, hc.model_masks(masks, cfg))
    np.testing.assert_allclose(_logits_fn(small_cfg)(small, x), masked, rtol=1e-5, atol=1e-5)


def test_extraction_keeps_sliding_windows_of_the_kept_layers_and_refuses_ragged_masks():
    params = _noisy_params(GQA)
    masks = {"layer": np.array([1.0, 0.0, 1.0])}
    _, small_cfg = fold(params, GQA, masks)
    assert small_cfg.sliding_window == (None, None)
    _, small_cfg = fold(params, GQA, {"layer": np.array([0.0, 1.0, 1.0])})
    assert small_cfg.sliding_window == (8, None)
    from jaxeff.errors import JaxeffError

    with pytest.raises(JaxeffError, match="kept layers keep"):
        fold(params, GQA, {"head": np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])})
    with pytest.raises(JaxeffError, match=r"masks.hidden: shape \(31,\)"):
        fold(params, GQA, {"hidden": np.ones(31)})


# ------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "override, match",
    [
        ("prune.target.d_model=64", r"prune.target.d_model: 64 is larger than the source model's 32"),
        ("prune.target.n_heads=3", r"prune.target.n_heads: 3 is not a multiple of the 2 query heads per kv head"),
        ("prune.target.n_layers=2", r"prune.target: equals the source model"),
    ],
)
def test_bad_prune_targets_are_one_line_config_errors(tiny_config, override, match):
    cfg = tiny_config(["method=shear", override])
    with pytest.raises(ConfigError, match=match) as e:
        make_method(cfg, Transformer(cfg.model))
    assert "\n" not in str(e.value)


def test_jaxeff_train_refuses_a_bad_target_before_writing_anything(tmp_path, capsys):
    code = main(["train", "configs/prune/shear.yaml", "prune.target.d_ff=999", f"logging.run_dir={tmp_path / 'runs'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: prune.target.d_ff: 999 is larger than the source model's 384 (model.d_ff)"
    assert not (tmp_path / "runs").exists()


def test_shipped_config_prunes_the_quickstart_model_to_its_target():
    from jaxeff.config import load_config

    cfg = load_config("configs/prune/shear.yaml")
    sizes = pruned_sizes(cfg.prune, cfg.model)
    assert sizes == {"head": (2, 1), "intermediate": (384, 256), "layer": (4, 3), "hidden": (128, 96)}
    assert cfg.model == load_config("configs/quickstart.yaml").model  # the source it says it prunes


def test_target_sparsity_warms_up_linearly_then_stays():
    sizes = {"head": (4, 1), "layer": (4, 3)}
    at = lambda step: {t: float(v) for t, v in target_sparsity(sizes, step, 10).items()}
    assert at(0) == {"head": 0.0, "layer": 0.0}
    assert at(5) == pytest.approx({"head": 0.375, "layer": 0.125})
    assert at(10) == at(50) == pytest.approx({"head": 0.75, "layer": 0.25})
    assert target_sparsity(sizes, 0, 0)["head"] == pytest.approx(0.75)


def test_optimizer_descends_on_weights_and_log_alpha_ascends_on_lambdas_and_clamps_log_alpha(tiny_config):
    cfg = tiny_config(["method=shear", "prune.target.d_ff=32", "prune.mask_lr=0.5", "prune.lambda_lr=0.25"])
    params = {"model": {"w": jnp.ones(3)}, "shear": {"log_alpha": {"intermediate": jnp.array([0.0, 4.5])}, "lambdas": {"intermediate": jnp.zeros(2)}}}
    trainable = jax.tree.map(lambda _: True, params)
    tx = shear_optimizer(cfg.prune, cfg.optim, 10, trainable)
    grads = jax.tree.map(jnp.ones_like, params)
    grads["shear"]["log_alpha"]["intermediate"] = jnp.array([1.0, -1.0])
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["model"]["w"]) < 0)
    np.testing.assert_allclose(updates["shear"]["lambdas"]["intermediate"], [0.25, 0.25], rtol=1e-4)  # ascent
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(new["shear"]["log_alpha"]["intermediate"], [-0.5, math.log(100)], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the trainer


def test_sharded_pruning_step_on_8_devices_trains_masks_and_multipliers(tiny_config):
    from jaxeff.train.inputs import build_data
    from jaxeff.train.loop import Trainer

    cfg = tiny_config(
        [
            "method=shear",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "prune.target.n_heads=2",
            "prune.target.d_ff=32",
            "prune.target.n_layers=1",
            "prune.target.d_model=16",
            "prune.warmup_fraction=0",
        ]
    )
    trainer = Trainer(cfg)
    assert len(trainer.mesh.devices.ravel()) == 8
    state = trainer.init_state()
    before = jax.device_get(state.params)
    assert trainer.param_shardings["model"]["layers_0"]["mlp"]["up"]["kernel"].spec != ()  # model sharded
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    for _ in range(2):
        state, metrics = trainer.train_step(state, loader.next_batch())
    after = jax.device_get(state.params)
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["shear/target_sparsity/intermediate"]) == pytest.approx(0.5)  # no warm-up
    for t in ("head", "intermediate", "layer", "hidden"):
        lam = after["shear"]["lambdas"][t]
        assert lam[0] < 0 < lam[1]  # sparsity below target: λ1 falls; λ2 (gap² > 0) rises
        assert np.all(after["shear"]["log_alpha"][t] <= math.log(100) + 1e-6)  # 5 clamped
        assert not np.allclose(after["shear"]["log_alpha"][t], before["shear"]["log_alpha"][t])
    assert not np.allclose(after["model"]["layers_0"]["mlp"]["up"]["kernel"], before["model"]["layers_0"]["mlp"]["up"]["kernel"])
    for k in ("shear/lm_loss", "shear/expected_params", "shear/sparsity/head", "shear/lambda1/layer"):
        assert k in metrics


def test_extract_run_writes_a_smaller_run_that_eval_and_init_from_read(tiny_config, tmp_path, capsys):
    from jaxeff.config import from_dict
    from jaxeff.train.loop import Trainer

    cfg = tiny_config(["method=shear", "prune.target.n_heads=2", "prune.target.d_ff=40", "prune.target.n_layers=1", "mesh.data=1", "data.batch_size=2"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state()
    noisy = jax.tree.map(lambda x: x - 0.5 * jax.random.normal(jax.random.key(3), x.shape), state.params["shear"])
    state = state.replace(params={**state.params, "shear": noisy})
    ckpt = Checkpointer(cfg.checkpoint_path)
    ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    ckpt.close()
    assert main(["extract", "--checkpoint", str(cfg.run_path), "--out", str(tmp_path / "small")]) == 0
    printed = capsys.readouterr().out
    assert '"n_layers": 1' in printed and '"head_dim": 8' in printed
    assert "model.d_model=32 model.n_layers=1 model.n_heads=2 model.n_kv_heads=1 model.head_dim=8 model.d_ff=40" in printed
    assert main(["extract", "--checkpoint", str(cfg.run_path), "--out", str(tmp_path / "small")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["extract", "--checkpoint", str(tmp_path / "small"), "--out", str(tmp_path / "x")]) == 2
    assert "expected a shear run" in capsys.readouterr().err

    saved = Checkpointer(tmp_path / "small" / "checkpoints", create=False)
    small_dict = saved.read_config()
    saved.close()
    assert small_dict["method"] == "lm" and small_dict["model"]["d_ff"] == 40
    # another run starts from it (train.init_from) and computes what the masked model computed
    raw = {
        **cfg.to_dict(),
        "method": "lm",
        "name": "next",
        "model": small_dict["model"],
        "train": {**cfg.to_dict()["train"], "init_from": str(tmp_path / "small")},
    }
    raw.pop("prune")
    nxt = Trainer(from_dict(raw), devices=jax.devices()[:1])
    base = nxt.load_base_params(str(tmp_path / "small"))
    x = _tokens(vocab=264)
    run = lambda tr: jax.jit(lambda p: tr.method.run(tr.model, p, x).logits)
    np.testing.assert_allclose(run(nxt)(base), run(trainer)(state.params), rtol=1e-5, atol=1e-5)
    assert main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "1+1=", "--max-new-tokens", "3"]) == 0


@pytest.mark.slow
def test_pruning_run_reaches_the_target_sparsities_and_its_extraction_trains_further(tiny_config, tmp_path):
    from jaxeff.train.loop import run_training

    target = ["prune.target.d_model=24", "prune.target.n_heads=2", "prune.target.n_layers=1", "prune.target.d_ff=32"]
    cfg = tiny_config(["method=shear", *target, "train.steps=100", "train.log_every=100", "train.eval_every=100", "checkpoint.every=100"])
    last = run_training(cfg)
    for t, goal in {"head": 0.5, "intermediate": 0.5, "layer": 0.5, "hidden": 0.25}.items():
        assert last[f"train/shear/target_sparsity/{t}"] == pytest.approx(goal)
        assert abs(last[f"train/shear/sparsity/{t}"] - goal) < 0.1, t
    assert last["train/shear/expected_params"] == pytest.approx(last["train/shear/target_params"], rel=0.25)
    out = extract_run(cfg.run_path, tmp_path / "runs" / "sheared")
    saved = Checkpointer(out / "checkpoints", create=False)
    small_model = saved.read_config()["model"]
    saved.close()
    overrides = [f"model.{k}={v}" for k, v in small_model.items() if v is not None and k != "rope_scaling"]
    nxt = tiny_config(["name=continued", f"train.init_from={out}", "train.steps=2", *overrides])
    result = run_training(nxt)
    # the extracted model starts where the pruned run's eval (deterministic masks) ended
    assert result["step"] == 2 and np.isfinite(result["train/loss"])
    assert abs(result["train/loss"] - last["eval/loss"]) < 1.0


@pytest.mark.slow
def test_resumed_pruning_run_continues_bit_for_bit_with_grad_accum_bf16_on_8_devices(tiny_config):
    import shutil

    from jaxeff.train.loop import run_training

    common = [
        "method=shear",
        "prune.target.d_model=24",
        "prune.target.n_heads=2",
        "prune.target.d_ff=32",
        "optim.grad_accum=2",
        "model.dtype=bfloat16",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    ]
    straight = tiny_config(common)
    a = run_training(straight)
    split = tiny_config([*common, "name=split", "resume=true"])
    shutil.copytree(straight.run_path / "checkpoints", split.run_path / "checkpoints")
    shutil.rmtree(split.run_path / "checkpoints" / "6")
    b = run_training(split)
    keys = [k for k in a if k.startswith(("train/shear/", "eval/loss"))] + ["train/loss"]
    assert len(keys) > 10 and {k: a[k] for k in keys} == {k: b[k] for k in keys}
