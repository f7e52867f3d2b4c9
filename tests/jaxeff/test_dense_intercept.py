"""jaxeff.dense.intercept_dense: LoRA, fake quant, quantized kernels and input statistics composed in
one forward pass, against hand-written float32 computations on fresh random inputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.dense import intercept_dense
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.peft.lora import init_adapters, lora_parts, target_paths
from jaxeff.quant.config import QuantConfig
from jaxeff.quant.qat import fake_quant_parts
from pallas_kernels.quant import dequantize, quantize


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(64, name="up")(x)
        return nn.Dense(32, name="down")(jax.nn.gelu(h))


class _Up(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="up")(x)


def _normal(seed, shape, std=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32)) * np.float32(std)


def _net(seed=0, d_in=64):
    params = {
        "up": {"kernel": _normal(seed, (d_in, 64), 0.2), "bias": _normal(seed + 1, (64,), 0.1)},
        "down": {"kernel": _normal(seed + 2, (64, 32), 0.2), "bias": _normal(seed + 3, (32,), 0.1)},
    }
    adapters = {
        name: {"a": _normal(seed + 4 + i, (p["kernel"].shape[0], 4), 0.2), "b": _normal(seed + 6 + i, (4, p["kernel"].shape[1]), 0.2)}
        for i, (name, p) in enumerate(params.items())
    }
    return params, adapters


def _symmetric_fq(v, bits, axis):
    """Symmetric absmax quantize-dequantize of a float32 numpy array along ``axis`` (one scale per slice)."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    m = np.maximum(np.abs(v.min(axis=axis, keepdims=True)), np.abs(v.max(axis=axis, keepdims=True)))
    scale = np.where(m > 0, m / qmax, np.float32(1.0)).astype(np.float32)
    return (np.clip(np.round(v / scale), -qmax, qmax) * scale).astype(np.float32)


def _gelu(v):
    return np.asarray(jax.nn.gelu(jnp.asarray(v)))


def test_lora_fake_quant_and_statistics_in_one_pass_equal_a_hand_written_layer():
    params, adapters = _net()
    x = _normal(10, (3, 5, 64))
    q = QuantConfig(weight={"bits": 4}, activation={"bits": 8}, weight_layers="up|down", activation_layers="up|down")
    parts = {**fake_quant_parts(params, q), **lora_parts(adapters)}
    with intercept_dense(**parts, observe={"up": lambda v: v, "down": lambda v: v}, lora_scale=2.0) as seen:
        out = _Net().apply({"params": params}, x)

    def layer(v, p, ad):  # x_q W_q + b + 2 x A B: weights per output column, activations per token; the adapter reads x itself
        base = _symmetric_fq(v, 8, -1) @ _symmetric_fq(p["kernel"], 4, 0) + p["bias"]
        return base + np.float32(2.0) * ((v @ ad["a"]) @ ad["b"])

    h = _gelu(layer(x, params["up"], adapters["up"]))
    want = layer(h, params["down"], adapters["down"])
    np.testing.assert_allclose(np.asarray(seen["up"]), x, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(seen["down"]), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    with intercept_dense(**lora_parts(adapters), lora_scale=2.0):  # the fake quant parts changed the output
        plain = _Net().apply({"params": params}, x)
    assert np.abs(np.asarray(plain) - want).max() > 1e-2


@pytest.mark.parametrize("fmt,backend", [("nf4", "reference"), ("int8", "reference"), ("nf4", "interpret")])
def test_lora_on_a_quantized_kernel_equals_lora_on_the_dequantized_kernel(fmt, backend):
    params, adapters = _net(seed=20, d_in=128)
    qws = {name: quantize(jnp.asarray(p["kernel"]), fmt, group_size=64 if fmt == "nf4" else None) for name, p in params.items()}
    x = _normal(30, (2, 8, 128))
    floats = {name: {"bias": p["bias"]} for name, p in params.items()}  # the float kernels need not exist
    with intercept_dense(kernel=qws, lora=lora_parts(adapters)["lora"], lora_scale=2.0, backend=backend, compute_dtype=jnp.float32):
        out = np.asarray(_Net().apply({"params": floats}, x))
    deq = {name: {**p, "kernel": np.asarray(dequantize(qws[name]))} for name, p in params.items()}
    with intercept_dense(**lora_parts(adapters), lora_scale=2.0):
        want = np.asarray(_Net().apply({"params": deq}, x))
        exact = np.asarray(_Net().apply({"params": params}, x))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # and the dequantized kernel is the float one within its quantization error (first layer: |x| |W - W_q| bounds it)
    err = np.abs(deq["up"]["kernel"] - params["up"]["kernel"])
    with intercept_dense(kernel={"up": qws["up"]}, lora={"up": adapters["up"]}, lora_scale=2.0, backend=backend, compute_dtype=jnp.float32):
        h_q = np.asarray(_Up().apply({"params": {"up": {"bias": params["up"]["bias"]}}}, x))
    h = x @ params["up"]["kernel"] + params["up"]["bias"] + 2.0 * (x @ adapters["up"]["a"]) @ adapters["up"]["b"]
    assert 0 < np.abs(h_q - h).max()
    assert np.all(np.abs(h_q - h) <= np.abs(x) @ err + 1e-4)
    assert 0 < np.abs(out - exact).max() < 0.2 * np.abs(exact).max()


def test_statistics_of_a_composed_pass_equal_a_statistics_only_pass():
    cfg = TransformerConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 10.0 if p.ndim == 2 else p, params)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 264)
    paths = target_paths(params, [r"layers_\d+/attn/(q|k|v|o)", r"layers_\d+/mlp/(gate|up|down)"])
    adapters = jax.tree.map(lambda a: a + 0.05, init_adapters(params, paths, 4, jax.random.key(3)))  # B != 0

    def sq_sum(v):
        return jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(0, 1))

    observe = {"/".join(p): sq_sum for p in paths}
    q = QuantConfig(weight={"bits": 4}, activation={"bits": 8})

    @functools.partial(jax.jit, static_argnums=1)
    def stats(params, composed):
        parts = {**fake_quant_parts(params, q), **lora_parts(adapters)} if composed else {}
        with intercept_dense(**parts, observe=observe, lora_scale=2.0, dropout=0.5 if composed else 0.0, rng=jax.random.key(2)) as seen:
            logits = model.apply({"params": params}, tokens).logits
        return seen, logits

    (alone, base), (composed, changed) = stats(params, False), stats(params, True)
    plain = jax.jit(lambda p: model.apply({"params": p}, tokens).logits)(params)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(plain))  # observing changes nothing
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-2
    assert set(composed) == set(alone) == set(observe)
    for p in ("layers_0/attn/q", "layers_0/attn/k", "layers_0/attn/v"):  # each sees its input before its own parts act
        np.testing.assert_array_equal(np.asarray(composed[p]), np.asarray(alone[p]))
    for p in ("layers_0/mlp/gate", "layers_1/attn/q"):  # downstream of changed layers: their inputs changed
        assert not np.allclose(np.asarray(composed[p]), np.asarray(alone[p]), rtol=1e-3)


def test_a_weight_transform_on_a_quantized_kernel_is_refused():
    params, _ = _net()
    qw = quantize(jnp.asarray(params["up"]["kernel"]), "int8")
    with pytest.raises(ValueError, match="'up' has a weight transform and a quantized kernel"):
        with intercept_dense(kernel={"up": qw}, weight={"up": lambda w: w}):
            _Net().apply({"params": params}, _normal(0, (2, 64)))
