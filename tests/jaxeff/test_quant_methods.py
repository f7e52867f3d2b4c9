"""Quantization methods: quantizers, fake quant (STE, LSQ), QAT in the sharded trainer, PTQ
calibration, conversion to the low-bit kernels (method ``quantized``), configs."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import load_config
from jaxeff.errors import ConfigError
from jaxeff.quant.config import QuantConfig
from jaxeff.quant.convert import convert_params, model_bytes, quantized_apply
from jaxeff.quant.fake_quant import fake_quant
from jaxeff.quant.ptq import calibrate
from jaxeff.quant.qat import fake_quant_activation, fake_quant_apply, quantized_model_params
from jaxeff.quant.quantizers import QuantSpec, compute_scale_zero, grouped, quantize_codes, quantize_dequantize
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer
from pallas_kernels.quant import dequantize, quantize

REPO = Path(__file__).resolve().parents[2]


def _codes(x, spec, axis=-1):
    scale, zero = compute_scale_zero(x, spec, axis)
    xg, _ = grouped(jnp.asarray(x, jnp.float32), spec, axis)
    return np.asarray(quantize_codes(xg, scale, zero, spec)), np.asarray(scale), np.asarray(zero)


# ---------------------------------------------------------------------------------------------
# quantizers vs numpy


def test_symmetric_absmax_worked_example():
    x = np.array([-1.0, 0.5, 0.27, 2.54], np.float32)
    q, scale, zero = _codes(x, QuantSpec(bits=8, granularity="tensor"))
    np.testing.assert_allclose(scale.ravel(), [2.54 / 127], rtol=1e-6)
    assert zero.ravel().tolist() == [0.0]
    np.testing.assert_array_equal(q, [-50, 25, 14, 127])  # 0.27 / 0.02 = 13.5 -> 14 (half to even)


def test_asymmetric_zero_point_worked_example():
    x = np.array([-1.0, 0.0, 2.0, 3.0], np.float32)
    q, scale, zero = _codes(x, QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    s = 4.0 / 255  # (max - min) / (2^8 - 1)
    np.testing.assert_allclose(scale.ravel(), [s], rtol=1e-6)
    assert zero.ravel().tolist() == [64.0]  # round(1 / s) = round(63.75)
    np.testing.assert_array_equal(q, np.clip(np.round(x / s) + 64, 0, 255))
    # 0 is exactly representable; a positive-only tensor widens its range down to 0 (zero point 0)
    assert float(quantize_dequantize(x, QuantSpec(bits=8, symmetric=False, granularity="tensor"), axis=-1)[1]) == 0.0
    _, s2, z2 = _codes(np.array([1.0, 2.0, 4.0], np.float32), QuantSpec(bits=4, symmetric=False, granularity="tensor"))
    assert z2.ravel().tolist() == [0.0]
    np.testing.assert_allclose(s2.ravel(), [4.0 / 15], rtol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_span_exactly_the_documented_range(bits, symmetric):
    x = np.random.default_rng(bits).normal(size=(256,)).astype(np.float32)
    q, _, _ = _codes(x, QuantSpec(bits=bits, symmetric=symmetric, granularity="tensor"))
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert q.min() >= lo and q.max() <= hi
    if symmetric:  # the largest |x| lands on an end of the grid
        assert np.abs(q).max() == hi
    else:  # min and max land on both ends
        assert lo in q and hi in q
    assert np.all(q == np.round(q))


def test_ternary_uses_the_absmean_scale_and_codes_minus_one_zero_one():
    w = np.array([[0.1, -0.5], [2.0, 0.0]], np.float32)
    spec = QuantSpec(ternary=True, granularity="tensor")
    q, scale, _ = _codes(w, spec, axis=-2)
    np.testing.assert_allclose(scale.ravel(), [np.abs(w).mean()], rtol=1e-6)  # 0.65
    np.testing.assert_array_equal(q, [[0, -1], [1, 0]])  # 0.15 -> 0, -0.77 -> -1, 3.08 -> clipped to 1
    np.testing.assert_allclose(quantize_dequantize(w, spec, axis=-2), np.array([[0, -1], [1, 0]]) * 0.65, rtol=1e-6)


def test_channel_and_group_scales_cover_their_slices():
    w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)  # [K, N]
    _, s_ch, _ = _codes(w, QuantSpec(bits=4, granularity="channel"), axis=-2)
    np.testing.assert_allclose(s_ch, np.abs(w).max(axis=0, keepdims=True) / 7, rtol=1e-6)
    _, s_g, _ = _codes(w, QuantSpec(bits=4, granularity="group", group_size=4), axis=-2)
    np.testing.assert_allclose(s_g, np.abs(w.reshape(2, 4, 3)).max(axis=1, keepdims=True) / 7, rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        compute_scale_zero(w, QuantSpec(bits=4, granularity="group", group_size=3), axis=-2)


# ---------------------------------------------------------------------------------------------
# fake quant: STE, forward, LSQ


def test_ste_gradient_is_identity_with_dynamic_scales_and_for_ternary_weights():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16)), jnp.float32)
    ternary = QuantSpec(ternary=True, granularity="tensor")
    assert np.abs(np.asarray(quantize_dequantize(x, ternary, axis=-1))).max() < np.abs(np.asarray(x)).max()  # clips
    for spec in (QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False), ternary):
        g = jax.grad(lambda v: jnp.sum(fake_quant(v, spec, axis=-1) * 3.0))(x)
        np.testing.assert_allclose(np.asarray(g), 3.0, rtol=1e-6)  # (x / s) * s: one rounding


def test_ste_gradient_is_zero_where_a_fixed_scale_clips():
    x = jnp.asarray([-3.0, -0.7, -0.5, 0.5, 0.7, 3.0])
    spec = QuantSpec(bits=4, granularity="tensor")  # codes [-7, 7]: range [-0.7, 0.7] at scale 0.1
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, spec, scale=jnp.full((1,), 0.1), zero=jnp.zeros((1,)))))(x)
    np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 1, 0])


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8),
        QuantSpec(bits=4, granularity="group", group_size=8),
        QuantSpec(bits=5, symmetric=False, granularity="tensor"),
        QuantSpec(ternary=True, granularity="tensor"),
    ],
)
def test_fake_quant_forward_equals_quantize_dequantize(spec):
    w = np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32)
    scale, zero = compute_scale_zero(w, spec, axis=-2)
    wg, _ = grouped(jnp.asarray(w), spec, -2)
    direct = ((quantize_codes(wg, scale, zero, spec) - zero) * scale).reshape(w.shape)
    np.testing.assert_array_equal(np.asarray(fake_quant(w, spec, axis=-2)), np.asarray(direct))


@pytest.mark.parametrize(
    "fmt,spec",
    [
        ("int8", QuantSpec(bits=8)),
        ("int4", QuantSpec(bits=4, granularity="group", group_size=64)),
        ("int4_asym", QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64)),
    ],
)
def test_fake_quant_grid_is_the_kernel_formats_grid(fmt, spec):
    # QAT trains on exactly the values the converted model's kernels use
    w = np.random.default_rng(3).normal(size=(128, 32)).astype(np.float32)
    kernel = dequantize(quantize(w, fmt.split("_")[0], symmetric=spec.symmetric, group_size=None if fmt == "int8" else 64))
    np.testing.assert_allclose(np.asarray(fake_quant(w, spec, axis=-2)), np.asarray(kernel), rtol=1e-6, atol=1e-6)


def test_learned_scale_gets_the_lsq_gradient():
    spec = QuantSpec(bits=4, granularity="tensor")
    x = jnp.asarray([0.33, 2.0])  # inside (v = 3.3 -> 3) and clipped (v = 20 -> 7)
    g = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s, learned=True)))(jnp.full((1,), 0.1))
    lsq = 1.0 / np.sqrt(2 * 7)
    np.testing.assert_allclose(float(g[0]), ((3 - 3.3) + 7) * lsq, rtol=1e-5)


def test_static_activation_range_clips_outside_values():
    spec = QuantSpec(bits=8, granularity="channel")
    y = fake_quant_activation(jnp.asarray([[-5.0, 0.5, 5.0]]), spec, act_range=(-1.0, 1.0))
    np.testing.assert_allclose(np.asarray(y), [[-1.0, round(0.5 * 127) / 127, 1.0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# QAT method


def _batch(cfg):
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    return loader.next_batch()


QAT = [
    "method=qat",
    "optim.name=sgd",
    "model.n_layers=1",
    "data.seq_len=16",
    "quant.weight.bits=4",
    "quant.weight.granularity=group",
    "quant.weight.group_size=32",
    "quant.activation.bits=8",
]


@pytest.mark.parametrize("learn", [pytest.param(False, marks=pytest.mark.slow), True])
def test_qat_step_on_8_devices_equals_the_single_device_step(tiny_config, learn):
    extra = [f"quant.weight.learnable_scale={str(learn).lower()}"]
    cfg1 = tiny_config(QAT + extra + ["mesh.data=1"])
    cfg8 = tiny_config(QAT + extra + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    batch = _batch(cfg1)
    t1, t8 = Trainer(cfg1, devices=jax.devices()[:1]), Trainer(cfg8)
    s1, m1 = t1.train_step(t1.init_state(), batch)
    s8, m8 = t8.train_step(t8.init_state(), batch)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6)
    if learn:  # the LSQ scales are parameters and moved
        s0 = jax.device_get(t1.init_state().params["qscales"])
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(jax.device_get(s1.params["qscales"]))))


def _tiny_model(tiny_config, overrides=()):
    from jaxeff.models import Transformer, init_params

    cfg = tiny_config(["model.n_layers=1"] + list(overrides))
    model = Transformer(cfg.model)
    params = init_params(model, jax.random.PRNGKey(0), (1, 8))
    # trained-looking weights: larger than the 0.02 init so quantization error is visible in the logits
    params = jax.tree.map(lambda p: p * 10.0 if p.ndim == 2 else p, params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 264, size=(2, 16)), jnp.int32)
    return cfg, model, params, tokens


def test_qat_forward_quantizes_only_the_selected_layers(tiny_config):
    cfg, model, params, tokens = _tiny_model(tiny_config)
    ref = jax.jit(lambda p: model.apply({"params": p}, tokens).logits)(params)
    none = QuantConfig(weight={"bits": 4}, activation={"bits": 8}, weight_layers="^nothing$", activation_layers="^nothing$")
    run = jax.jit(lambda p, q: fake_quant_apply(model, p, tokens, q).logits, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(run(params, none)), np.asarray(ref))
    q = QuantConfig(weight={"bits": 4})
    out = run(params, q)
    assert float(jnp.max(jnp.abs(out - ref))) > 1e-3
    # weight-only fake quant = the float model on the quantize-dequantize weights
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(model.apply({"params": quantized_model_params(params, q)}, tokens).logits), rtol=1e-5, atol=1e-5
    )
    assert np.array_equal(quantized_model_params(params, q)["embed"]["embedding"], params["embed"]["embedding"])


# ---------------------------------------------------------------------------------------------
# PTQ static calibration


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="b")(nn.relu(nn.Dense(4, name="a")(x)))


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_static_calibration_picks_the_documented_ranges(method):
    model = _TwoDense()
    batches = [np.random.default_rng(i).normal(size=(16, 5)).astype(np.float32) * (i + 1) for i in range(4)]
    params = model.init(jax.random.PRNGKey(0), batches[0])["params"]
    q = QuantConfig(activation={"bits": 8}, activation_layers="^a$", calibration={"batches": 3, "method": method, "percentile": 99.0})
    ranges = calibrate(model, params, batches, q)
    assert set(ranges) == {"a"}
    used = np.concatenate([b.ravel() for b in batches[:3]])  # only `batches` batches
    want = (used.min(), used.max()) if method == "minmax" else (np.percentile(used, 1.0), np.percentile(used, 99.0))
    np.testing.assert_allclose(ranges["a"], want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# conversion to the kernels


# ||logits - float logits|| / ||float logits|| of the converted one-layer model: observed 0.015 (int8),
# 0.26 (int4), 0.24 (nf4), 0.023 (w8a8); bounds ~2.5x observed
@pytest.mark.parametrize(
    "fmt,extra,rel_tol",
    [
        ("int8", {}, 0.04),
        ("int4", {"group_size": 32}, 0.6),
        ("nf4", {"group_size": 32}, 0.6),
        ("w8a8", {}, 0.06),
        ("w8a8", {"outlier_threshold": 6.0}, 0.06),
    ],
)
def test_converted_model_is_close_to_the_float_model_and_smaller(tiny_config, fmt, extra, rel_tol):
    cfg, model, params, tokens = _tiny_model(tiny_config)
    q = QuantConfig(convert={"format": fmt, "backend": "reference", **extra})
    qparams = convert_params(params, q)
    ref = np.asarray(model.apply({"params": params}, tokens).logits)
    out = np.asarray(quantized_apply(model, qparams, tokens, q).logits)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < err < rel_tol
    if fmt != "w8a8":  # weight-only: exactly the float model on the dequantized kernels
        deq = jax.tree.map(lambda l: dequantize(l) if hasattr(l, "fmt") else l, qparams, is_leaf=lambda l: hasattr(l, "fmt"))
        np.testing.assert_allclose(out, np.asarray(model.apply({"params": deq}, tokens).logits), rtol=1e-4, atol=1e-4)
    b_float, b_q = model_bytes(params), model_bytes(qparams)
    kernels = b_float["total"] - b_q["float"]  # float bytes of the kernels that were converted
    assert b_q["total"] < b_float["total"]
    assert b_q["quantized"] < kernels * (0.3 if fmt in ("int8", "w8a8") else 0.2)


def test_outlier_decomposition_lowers_the_w8a8_error_when_a_feature_exceeds_6(tiny_config):
    cfg, model, params, tokens = _tiny_model(tiny_config)
    scale = params["layers_0"]["mlp_norm"]["scale"]
    params = {**params, "layers_0": {**params["layers_0"], "mlp_norm": {"scale": scale.at[3].set(40.0)}}}
    ref = np.asarray(model.apply({"params": params}, tokens).logits)
    errs = []
    for thr in (None, 6.0):
        q = QuantConfig(convert={"format": "w8a8", "backend": "reference", "outlier_threshold": thr})
        out = np.asarray(quantized_apply(model, convert_params(params, q), tokens, q).logits)
        errs.append(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    # observed 0.034 -> 0.027: the outlier column's int8 *weight* rows (kept int8 by a prepared
    # weight) still dominate; the activation side of feature 3 no longer crushes the other features' scale
    assert errs[1] < 0.9 * errs[0]


@pytest.mark.parametrize("fmt", ["int4", pytest.param("w8a8", marks=pytest.mark.slow)])
def test_converted_model_on_the_interpret_kernels_equals_the_reference_path(tiny_config, fmt):
    cfg, model, params, tokens = _tiny_model(tiny_config)
    q = QuantConfig(convert={"format": fmt, **({"group_size": 32} if fmt == "int4" else {"outlier_threshold": 6.0})})
    qparams = convert_params(params, q)
    tokens = tokens[:1, :8]
    ref = quantized_apply(model, qparams, tokens, q, backend="reference").logits
    out = jax.jit(lambda p, t: quantized_apply(model, p, t, q, backend="interpret").logits)(qparams, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_quantized_method_evaluates_on_8_devices_like_on_one(tiny_config):
    ov = [
        "method=quantized",
        "quant.convert.format=int4",
        "quant.convert.group_size=32",
        "quant.convert.backend=reference",
        "model.n_layers=1",
        "data.seq_len=16",
    ]
    cfg1 = tiny_config(ov + ["mesh.data=1"])
    cfg8 = tiny_config(ov + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    _, _, eval_sets = build_data(cfg1.data, cfg1.model.vocab_size)
    t1, t8 = Trainer(cfg1, devices=jax.devices()[:1]), Trainer(cfg8)
    s1 = t1.init_state()
    assert not any(jax.tree.leaves(t1.method.trainable(s1.params)))
    e1, e8 = t1.evaluate(s1.params, eval_sets, 1), t8.evaluate(t8.init_state().params, eval_sets, 1)
    np.testing.assert_allclose(e8["eval/loss"], e1["eval/loss"], rtol=1e-5)


@pytest.mark.slow
def test_convert_a_trained_checkpoint_then_eval_and_generate_from_the_cli(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main
    from jaxeff.quant.convert import main as convert_main
    from jaxeff.train.loop import run_training

    cfg = tiny_config(["train.steps=2", "checkpoint.every=2", "mesh.data=1"])
    run_training(cfg, devices=jax.devices()[:1])
    out = tmp_path / "converted"
    assert (
        convert_main(
            [
                "--checkpoint",
                str(cfg.run_path),
                "--out",
                str(out),
                "quant.convert.format=int4",
                "quant.convert.group_size=32",
                "quant.convert.backend=reference",
            ]
        )
        == 0
    )
    report = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert int(report["converted_total"]) < int(report["source_bytes"])
    assert main(["generate", "--checkpoint", str(out), "--prompt", "1+1=", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("1+1=")
    config = tmp_path / "quantized.yaml"
    config.write_text(cfg.to_yaml())
    assert (
        main(
            [
                "eval",
                str(config),
                "method=quantized",
                "quant.convert.format=int4",
                "quant.convert.group_size=32",
                "quant.convert.backend=reference",
                "mesh.data=-1",
                "--checkpoint",
                str(out),
            ]
        )
        == 0
    )
    assert "eval/loss" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "quant").glob("*.yaml")), ids=lambda p: p.name)
def test_each_quant_config_loads(path):
    cfg = load_config(path)
    assert cfg.method in ("qat", "quantized")


@pytest.mark.parametrize(
    "override,key",
    [
        ("quant.weight.bits=9", "quant.weight.bits"),
        ("quant.weight_layers=((", "quant.weight_layers"),
        ("quant.weight.granularity=row", "quant.weight.granularity"),
        ("quant.convert.double_quant=true", "convert.double_quant"),
        ("quant.activation.ternary=true", "activation"),
        ("quant.weight.symmetric=false quant.weight.learnable_scale=true", "weight.learnable_scale"),
    ],
)
def test_a_bad_quant_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(None, override.split())
    assert "\n" not in str(e.value)
