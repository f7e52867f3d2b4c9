"""PEFT: LoRA / QLoRA / BitFit as trainer methods, adapter checkpoints, merging, the CLI."""

import glob
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxeff.config import load_config
from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.peft import apply_lora, init_adapters, merge, switch, target_paths, unmerge
from jaxeff.peft.adapters import AdapterSet, fingerprint, load_adapter, save_adapter
from jaxeff.peft.qlora import dequantize_base, quantize_base, strip_kernels
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, run_training

CFG = TransformerConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(_host(tree)).items()}


def _tokens(seed=0, shape=(2, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 264)


def _random_adapters(params, paths, rank=4, seed=1, std=0.05):
    """Adapters with B != 0 (a fresh adapter's B is zero, which would make every check trivial)."""
    ad = init_adapters(params, paths, rank, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(lambda p, x: x if p[-1].key == "a" else std * jax.random.normal(jax.random.key(seed + 7), x.shape), ad)


@pytest.fixture(scope="module")
def base():
    model = Transformer(CFG)
    params = init_params(model, jax.random.key(0))
    return model, params, target_paths(params, [r"layers_\d+/attn/(q|k|v|o)", r"layers_\d+/mlp/(gate|up|down)"])


# ------------------------------------------------------------------------------------------------
# LoRA as a tree transform


def test_lora_targets_are_chosen_by_module_path_regex(base):
    _, params, paths = base
    assert len(paths) == 2 * 7
    only_qv = target_paths(params, [r"layers_1/attn/(q|v)"])
    assert only_qv == [("layers_1", "attn", "q"), ("layers_1", "attn", "v")]
    with pytest.raises(ConfigError, match="peft.targets"):
        target_paths(params, ["nothing/matches"])
    with pytest.raises(ConfigError, match="peft.targets: '\\(' is not a valid regex"):
        target_paths(params, ["("])


def test_fresh_lora_reproduces_the_base_exactly(base):
    model, params, paths = base
    ad = init_adapters(params, paths, 4, jax.random.key(3))
    assert all(np.any(np.asarray(v) != 0) for k, v in _flat(ad).items() if k.endswith("/a"))
    x = _tokens()
    ref = model.apply({"params": params}, x).logits
    np.testing.assert_array_equal(apply_lora(model, params, ad, 2.0, x).logits, ref)


def test_merged_outputs_equal_unmerged_and_unmerge_restores_the_kernels(base):
    model, params, paths = base
    ad = _random_adapters(params, paths)
    x = _tokens()
    unmerged = apply_lora(model, params, ad, 2.0, x).logits
    merged_params = merge(params, ad, 2.0)
    merged = model.apply({"params": merged_params}, x).logits
    assert float(jnp.max(jnp.abs(merged - model.apply({"params": params}, x).logits))) > 1e-3  # adapters matter
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    back = _flat(unmerge(merged_params, ad, 2.0))
    for k, v in _flat(params).items():
        np.testing.assert_allclose(back[k], v, atol=1e-6)


def test_lora_dropout_acts_on_the_adapter_path_only_when_given_a_key(base):
    from jaxeff.peft import lora_interceptor

    model, params, paths = base
    x, ad = _tokens(), _random_adapters(params, paths)

    def run(adapters, **kw):
        with lora_interceptor(adapters, 2.0, **kw):
            return model.apply({"params": params}, x).logits

    plain = run(ad)
    dropped = run(ad, dropout=0.5, rng=jax.random.key(0))
    assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
    np.testing.assert_array_equal(run(ad, dropout=0.5, rng=jax.random.key(0)), dropped)  # same key, same mask
    fresh = init_adapters(params, paths, 4, jax.random.key(3))  # B = 0: dropout cannot change the base
    np.testing.assert_array_equal(run(fresh, dropout=0.5, rng=jax.random.key(0)), run(fresh))


def test_switching_adapters_on_one_base(base):
    model, params, paths = base
    a1, a2 = _random_adapters(params, paths, seed=1), _random_adapters(params, paths, seed=2)
    x = _tokens()
    switched = switch(merge(params, a1, 2.0), a1, a2, 2.0)
    np.testing.assert_allclose(model.apply({"params": switched}, x).logits, apply_lora(model, params, a2, 2.0, x).logits, rtol=1e-4, atol=1e-4)
    bank = AdapterSet(model, params, _model_dict())
    bank.add("one", a1, 2.0)
    bank.add("two", a2, 2.0)
    out1, out2 = bank.apply("one", x).logits, bank.apply("two", x).logits
    assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-3
    np.testing.assert_allclose(model.apply({"params": bank.params("two")}, x).logits, out2, rtol=1e-4, atol=1e-4)


def _model_dict():
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(CFG)))


def test_adapter_round_trip_and_a_different_base_is_refused(base, tmp_path):
    model, params, paths = base
    ad = _random_adapters(params, paths)
    mcfg = _model_dict()
    fp = fingerprint(params, mcfg)
    meta = {
        "format": "jaxeff-lora-adapter/1",
        "method": "lora",
        "rank": 4,
        "alpha": 8.0,
        "scale": 2.0,
        "targets": [],
        "base_fingerprint": fp,
        "base_path": "runs/base",
        "base_model": mcfg,
    }
    save_adapter(tmp_path / "ad", ad, meta)
    loaded, m = load_adapter(tmp_path / "ad", base=params, model_cfg=mcfg)
    assert m["scale"] == 2.0
    for k, v in _flat(ad).items():
        np.testing.assert_array_equal(_flat(loaded)[k], v)
    x = _tokens()
    np.testing.assert_array_equal(apply_lora(model, params, loaded, 2.0, x).logits, apply_lora(model, params, ad, 2.0, x).logits)
    other = init_params(model, jax.random.key(1))  # same architecture, other weights
    with pytest.raises(CheckpointError, match="was trained on base .* not on this base"):
        load_adapter(tmp_path / "ad", base=other, model_cfg=mcfg)
    with pytest.raises(CheckpointError, match="different model: model.d_model"):
        load_adapter(tmp_path / "ad", base=params, model_cfg={**mcfg, "d_model": 64})
    with pytest.raises(CheckpointError, match="already holds an adapter"):
        save_adapter(tmp_path / "ad", ad, meta)


# ------------------------------------------------------------------------------------------------
# QLoRA


def test_qlora_base_is_nf4_at_about_half_a_byte_per_parameter(base):
    from jaxeff.peft.qlora import qbase_stats

    _, params, paths = base
    big = {"w": {"kernel": jax.random.normal(jax.random.key(0), (256, 512)) * 0.02}}
    stats = qbase_stats(quantize_base(big, [("w",)]))
    # 4-bit codes + one int8 absmax per 64 + f32 double-quant constants per 256 x 64 block
    assert stats["bytes_per_param"] == pytest.approx(0.5 + 1 / 64 + 4 / (256 * 64), rel=0.01)
    q = quantize_base(params, paths)
    deq = dequantize_base(strip_kernels(params, paths), q)
    assert set(_flat(deq)) == set(_flat(params))
    w, wq = _flat(params)["layers_0/attn/q/kernel"], _flat(deq)["layers_0/attn/q/kernel"]
    assert 0 < np.abs(w - wq).max() < 0.2 * np.abs(w).max()
    # a fresh QLoRA model (B = 0) is the NF4 base: the dequantized model, in float32 compute
    from jaxeff.peft import lora_interceptor

    model, x = base[0], _tokens()
    fresh = init_adapters(params, paths, 4, jax.random.key(3))
    with lora_interceptor(fresh, 2.0, qbase=q, backend="reference", compute_dtype=jnp.float32):
        out = model.apply({"params": strip_kernels(params, paths)}, x).logits
    np.testing.assert_allclose(out, model.apply({"params": deq}, x).logits, rtol=1e-5, atol=1e-5)
    # with biases (which QLoRA reads from the float part of the tree)
    import dataclasses

    bmodel = Transformer(dataclasses.replace(CFG, use_bias=True, n_layers=1))
    bparams = jax.tree_util.tree_map_with_path(lambda p, v: v + 0.1 if p[-1].key == "bias" else v, init_params(bmodel, jax.random.key(0)))
    bpaths = target_paths(bparams, [r"layers_0/(attn|mlp)/.*"])
    bq = quantize_base(bparams, bpaths)
    with lora_interceptor(init_adapters(bparams, bpaths, 4, jax.random.key(3)), 2.0, qbase=bq, backend="reference", compute_dtype=jnp.float32):
        out = bmodel.apply({"params": strip_kernels(bparams, bpaths)}, x).logits
    bdeq = dequantize_base(strip_kernels(bparams, bpaths), bq)
    np.testing.assert_allclose(out, bmodel.apply({"params": bdeq}, x).logits, rtol=1e-5, atol=1e-5)


def test_qlora_gradient_wrt_adapters_matches_a_dequantized_float_reference(base):
    """Pallas kernel (interpret mode) with the NF4 base vs plain float LoRA on the dequantized base."""
    from jaxeff.peft import lora_interceptor
    from jaxeff.train.losses import cross_entropy

    model, params, _ = base
    paths = target_paths(params, [r"layers_0/attn/(q|o)", r"layers_0/mlp/down"])  # small: interpret is slow
    q = quantize_base(params, paths)
    rest = strip_kernels(params, paths)
    ad = _random_adapters(params, paths)
    x = _tokens(shape=(2, 8))
    tgt, mask = jnp.roll(x, -1, 1), jnp.ones(x.shape, jnp.float32)

    def kernel_loss(a):
        with lora_interceptor(a, 2.0, qbase=q, backend="interpret", compute_dtype=jnp.float32):
            return cross_entropy(model.apply({"params": rest}, x).logits, tgt, mask)[0]

    def float_loss(a):
        return cross_entropy(apply_lora(model, dequantize_base(rest, q), a, 2.0, x).logits, tgt, mask)[0]

    lk, gk = jax.value_and_grad(kernel_loss)(ad)
    lf, gf = jax.value_and_grad(float_loss)(ad)
    np.testing.assert_allclose(lk, lf, rtol=1e-5)
    gk, gf = _flat(gk), _flat(gf)
    assert set(gk) == {f"{'/'.join(p)}/{n}" for p in paths for n in "ab"}
    for k in gf:
        assert np.abs(gf[k]).max() > 0
        np.testing.assert_allclose(gk[k], gf[k], rtol=2e-4, atol=1e-6 * np.abs(gf[k]).max() + 1e-9)


# ------------------------------------------------------------------------------------------------
# in the sharded trainer


def _batches(cfg, n):
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    return [loader.next_batch() for _ in range(n)]


QLORA_TARGETS = r"peft.targets=[layers_\d+/attn/(q|v)]"  # fewer NF4 kernels: a faster compile on CPU


def _check_only_trainable_changed(method, cfg, trainer, state, before, after):
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    if method == "bitfit":
        assert changed and all(k.endswith("/bias") for k in changed)
        assert {k for k in before if k.endswith("/bias")} == changed
    else:
        assert changed == {k for k in before if k.startswith("lora/") and k.endswith("/b")} | {
            k for k in before if k.startswith("lora/") and k.endswith("/a")
        }
    if method == "qlora":
        assert not any(k.endswith("/attn/q/kernel") for k in before)  # the float kernels are gone
        assert all(v.dtype == jnp.bfloat16 for k, v in after.items() if k.startswith("lora/"))
    # optimizer state only for trainable leaves: adam's mu and nu
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert n_opt == 2 * trainer.n_trainable
    itemsize = 2 if method == "qlora" else 4  # bf16 / float32 adapters
    assert 0 <= trainer.opt_state_bytes - 2 * itemsize * trainer.n_trainable <= 64  # + adam's step counters
    assert 0 < trainer.trainable_pct == 100 * trainer.n_trainable / cfg.model.param_count() < 50


@pytest.mark.parametrize("method,extra", [("lora", []), ("bitfit", ["model.use_bias=true"])])
def test_training_on_8_devices_changes_only_the_trainable_parameters(tiny_config, method, extra):
    assert jax.device_count() == 8
    cfg = tiny_config([f"method={method}", "mesh.data=4", "mesh.fsdp=2", *extra])
    trainer = Trainer(cfg)
    state = trainer.init_state()
    before = _flat(state.params)
    for batch in _batches(cfg, 2):
        state, metrics = trainer.train_step(state, batch)
    _check_only_trainable_changed(method, cfg, trainer, state, before, _flat(state.params))


def test_bitfit_can_also_train_norm_scales_and_needs_biases(tiny_config):
    cfg = tiny_config(["method=bitfit", "model.use_bias=true", "peft.train_norms=true"])
    trainer = Trainer(cfg)
    trainable = _flat(trainer.method.trainable(trainer.init_state().params))
    assert {k for k, t in trainable.items() if t} == {k for k in trainable if k.endswith(("/bias", "/scale"))}
    with pytest.raises(ConfigError, match="model.use_bias"):
        Trainer(tiny_config(["method=bitfit"]))


def test_qlora_on_8_devices_trains_only_adapters_and_resumes_on_a_fresh_trainer(tiny_config, tmp_path):
    """The NF4 base is not checkpointed: a new trainer re-quantizes the same base, bit for bit."""
    from jaxeff.train.checkpoint import Checkpointer

    assert jax.device_count() == 8
    cfg = tiny_config(["method=qlora", "mesh.data=4", "mesh.fsdp=2", QLORA_TARGETS])
    b1, b2, b3 = _batches(cfg, 3)
    first = Trainer(cfg)
    state = first.init_state()
    before = _flat(state.params)
    state, _ = first.train_step(state, b1)
    state, _ = first.train_step(state, b2)
    _check_only_trainable_changed("qlora", cfg, first, state, before, _flat(state.params))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, data_state={}, config=cfg.to_dict())
    expected, m_expected = first.train_step(state, b3)
    second = Trainer(cfg)
    restored, _ = second.restore(ckpt)
    ckpt.close()
    got, m_got = second.train_step(restored, b3)
    assert float(m_got["loss"]) == float(m_expected["loss"])
    for k, v in _flat(expected.params).items():
        np.testing.assert_array_equal(_flat(got.params)[k], v)


@pytest.mark.slow
def test_lora_run_resumes_bit_for_bit_and_logs_parameter_stats(tiny_config):
    full = run_training(tiny_config(["method=lora", "name=full", "train.steps=4", "checkpoint.every=2"]))
    cfg = tiny_config(["method=lora", "name=split", "train.steps=2", "checkpoint.every=2"])
    run_training(cfg)
    resumed = run_training(tiny_config(["method=lora", "name=split", "train.steps=4", "checkpoint.every=2", "resume=true"]))
    assert resumed["train/loss"] == full["train/loss"]
    assert resumed["eval/loss"] == full["eval/loss"]
    assert 0 < full["params/trainable_pct"] < 50
    # adam: mu + nu of the adapters (float32), nothing for the base
    assert 0 <= full["params/opt_state_bytes"] - 2 * 4 * full["params/trainable"] <= 64  # + step counters


# ------------------------------------------------------------------------------------------------
# from a pretrained base, through the CLI


@pytest.mark.slow
def test_cli_exports_an_adapter_and_merges_it_into_the_base(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main
    from jaxeff.train.loop import load_params

    run_training(tiny_config(["name=base", "train.steps=2"]))
    base_dir = str(tmp_path / "runs" / "base")
    lora_cfg = tiny_config(["name=ft", "method=lora", "train.steps=3", f"train.init_from={base_dir}", "data.domains=[records]"])
    result = run_training(lora_cfg)
    assert main(["export-adapter", "--checkpoint", str(tmp_path / "runs" / "ft"), "--out", str(tmp_path / "ad")]) == 0
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["scale"] == 2.0
    assert main(["merge-adapter", "--base", base_dir, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "runs" / "merged")]) == 0
    # the merged run evaluates like the adapter run
    _, _, eval_sets = build_data(lora_cfg.data, lora_cfg.model.vocab_size)
    eval_cfg = tiny_config(["name=merged", "data.domains=[records]"])
    trainer, params = load_params(eval_cfg, tmp_path / "runs" / "merged" / "checkpoints")
    ev = trainer.evaluate(params, eval_sets, eval_cfg.train.eval_batches)
    assert ev["eval/loss"] == pytest.approx(result["eval/loss"], abs=1e-4)
    # an adapter onto another base: one line, exit code 2
    run_training(tiny_config(["name=other", "train.steps=2", "seed=5"]))
    capsys.readouterr()
    assert (
        main(["merge-adapter", "--base", str(tmp_path / "runs" / "other"), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "runs" / "merged2")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapter") and "not on this base" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("path", sorted(glob.glob("configs/peft/*.yaml")))
def test_peft_configs_load(path):
    cfg = load_config(path)
    assert cfg.method in ("lora", "qlora", "bitfit")


def test_peft_configs_exist():
    assert {p.split("/")[-1] for p in glob.glob("configs/peft/*.yaml")} >= {"lora.yaml", "qlora.yaml", "bitfit.yaml"}


def test_bad_peft_config_is_one_line_naming_the_key(tiny_config):
    with pytest.raises(ConfigError, match="peft.rank"):
        tiny_config(["method=lora", "peft.rank=0"])
    with pytest.raises(ConfigError, match="peft.targets"):
        Trainer(tiny_config(["method=lora", "peft.targets=[nope]"]))
