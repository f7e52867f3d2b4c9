"""TTT-naive (dynamic evaluation): chunked SGD at test time on an ordinarily trained model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.models.transformer import init_cache
from jaxeff.ttt.naive import dynamic_eval, naive_token_losses, trainable_paths

CFG = TransformerConfig(vocab_size=48, d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64, sliding_window=6)
SHAPE = (2, 27)  # 26 predictions: chunks of 8, 8, 8 and 2 (one shape and chunk for all tests: few compilations)
MLP3 = [("layers_3", "mlp", n, "kernel") for n in ("down", "gate", "up")]
PATHS = set(MLP3) | {("layers_2", "attn", "q", "kernel")}


def _some(path):
    return path.startswith("layers_3/mlp/") or path == "layers_2/attn/q/kernel"


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    return model, jax.jit(init_params, static_argnums=0)(model, jax.random.key(0))


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _plain_losses(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1]).logits
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.value_and_grad, argnums=1, has_aux=True)
def _chunk_grad(model, params, cache, inp, tgt):
    out = model.apply({"params": params}, inp, cache=cache)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(out.logits[0]), tgt[0][:, None], axis=-1)[:, 0]
    return nll.mean(), (nll, out.cache)


def _unrolled(model, params, row, *, chunk, lr, clip, paths):
    """Reference: one row, a Python loop over chunks (the last one shorter), a gradient of the
    whole tree masked to ``paths``, one clipped SGD step per chunk."""
    inputs, targets = row[:-1], row[1:]
    cache = init_cache(model.config, 1, len(inputs))
    flat = traverse_util.flatten_dict(params)
    losses = []
    for s in range(0, len(inputs), chunk):
        inp, tgt = inputs[s : s + chunk][None], targets[s : s + chunk][None]
        (_, (nll, cache)), grads = _chunk_grad(model, traverse_util.unflatten_dict(flat), cache, inp, tgt)
        losses.append(nll)
        g = {k: v for k, v in traverse_util.flatten_dict(grads).items() if k in paths}
        norm = float(np.sqrt(sum(float(jnp.sum(x * x)) for x in g.values())))
        scale = min(1.0, clip / norm)
        flat = {k: (v - lr * scale * g[k] if k in g else v) for k, v in flat.items()}
    return np.concatenate(losses), flat


def test_scan_equals_an_unrolled_python_loop_of_clipped_sgd_steps(setup):
    model, params = setup
    tokens = _tokens(SHAPE)
    losses, updated = dynamic_eval(model, params, tokens, chunk=8, lr=0.5, clip=0.05, trainable=_some)
    assert set(updated) == PATHS
    for r in range(2):
        ref_losses, ref_flat = _unrolled(model, params, tokens[r], chunk=8, lr=0.5, clip=0.05, paths=PATHS)
        np.testing.assert_allclose(losses[r], ref_losses, rtol=1e-5, atol=1e-5)
        for k in PATHS:
            np.testing.assert_allclose(updated[k][r], ref_flat[k], rtol=1e-5, atol=1e-6)
    # the steps did something: the later chunks' losses moved away from the plain model's
    assert float(jnp.abs(losses[:, 8:] - _plain_losses(model, params, tokens)[:, 8:]).max()) > 1e-4


def test_lr_zero_gives_the_plain_models_per_token_losses(setup):
    model, params = setup
    tokens = _tokens(SHAPE, seed=2)
    losses = naive_token_losses(model, params, tokens, chunk=8, lr=0.0, trainable=_some)
    assert losses.shape == (2, 26) and losses.dtype == jnp.float32
    np.testing.assert_allclose(losses, _plain_losses(model, params, tokens), rtol=1e-5, atol=1e-5)


def test_first_chunk_loss_is_the_plain_models_and_later_chunks_see_the_updates(setup):
    model, params = setup
    tokens = _tokens(SHAPE, seed=3)
    losses = naive_token_losses(model, params, tokens, chunk=8, lr=1.0, clip=1.0, trainable="all")
    plain = _plain_losses(model, params, tokens)
    np.testing.assert_allclose(losses[:, :8], plain[:, :8], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(losses[:, 8:] - plain[:, 8:]).max()) > 1e-2


def test_dynamic_evaluation_lowers_the_loss_on_a_pattern_repeated_beyond_the_window(setup):
    model, params = setup  # window 6: the model cannot see the earlier copies of the 9-token pattern
    tokens = jnp.tile(_tokens((2, 9), seed=5), (1, 3))
    plain = _plain_losses(model, params, tokens)
    naive = naive_token_losses(model, params, tokens, chunk=8, lr=1.0, clip=1.0, trainable="all")
    third_copy = slice(17, None)
    assert float(naive[:, third_copy].mean()) < float(plain[:, third_copy].mean()) - 0.5


def test_only_the_chosen_parameters_are_updated_and_each_row_adapts_on_its_own(setup):
    model, params = setup
    tokens = _tokens(SHAPE, seed=4)
    losses, updated = dynamic_eval(model, params, tokens, chunk=8, lr=1.0, clip=1.0, trainable=_some)
    assert set(updated) == PATHS
    flat = traverse_util.flatten_dict(params)
    for k in PATHS:
        assert updated[k].shape == (2, *flat[k].shape)
        assert float(jnp.abs(updated[k][0] - flat[k]).max()) > 0  # changed
        assert float(jnp.abs(updated[k][0] - updated[k][1]).max()) > 0  # one copy per row
    # row 0 next to another second row gets the same losses and weights: rows do not leak
    other = tokens.at[1].set(_tokens((27,), seed=6))
    losses2, updated2 = dynamic_eval(model, params, other, chunk=8, lr=1.0, clip=1.0, trainable=_some)
    assert float(jnp.abs(losses2[1] - losses[1]).max()) > 1e-3
    np.testing.assert_allclose(losses2[0], losses[0], rtol=1e-6, atol=1e-6)
    for k in PATHS:
        np.testing.assert_allclose(updated2[k][0], updated[k][0], rtol=1e-6, atol=1e-7)


def test_trainable_presets_and_regexes_select_parameters_by_path(setup):
    _, params = setup
    assert trainable_paths(params, "mlp_last_quarter", 4) == MLP3
    eight = {f"layers_{i}": {"mlp": {"up": {"kernel": 0}}} for i in range(8)}
    assert [k[0] for k in trainable_paths(eight, "mlp_last_quarter", 8)] == ["layers_6", "layers_7"]
    assert len(trainable_paths(params, "mlp", 4)) == 12
    assert len(trainable_paths(params, "all", 4)) == len(traverse_util.flatten_dict(params))
    assert trainable_paths(params, r"layers_3/mlp/(gate|up)", 4) == MLP3[1:]
    assert sorted(trainable_paths(params, _some, 4)) == sorted(PATHS)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(chunk=0, lr=0.1), "chunk"),
        (dict(chunk=4, lr=-1.0), "lr"),
        (dict(chunk=4, lr=0.1, clip=0.0), "clip"),
        (dict(chunk=4, lr=0.1, trainable="nothing/here"), "trainable"),
        (dict(chunk=4, lr=0.1, trainable="("), "trainable"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_argument(setup, kwargs, field):
    model, params = setup
    with pytest.raises(ConfigError, match=f"^{field}: ") as e:
        naive_token_losses(model, params, _tokens((1, 12)), **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^tokens: "):
        naive_token_losses(model, params, _tokens((12,)), chunk=4, lr=0.1)
