import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models.attention import _dense_attention, banded_window_attention, xla_attention


def _inputs(key, b=2, t=37, h=4, kvh=2, d=8):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, t, kvh, d)), jax.random.normal(kv, (b, t, kvh, d)))


def _dense(q, k, v, window, seg=None):
    return _dense_attention(q, k, v, causal=True, window=window, q_segment_ids=seg, kv_segment_ids=seg, q_offset=0, kv_valid=None, scale=None)


@pytest.mark.parametrize("window,t", [(1, 9), (5, 37), (8, 32), (8, 33), (40, 37)])
def test_banded_window_attention_equals_the_dense_masked_computation(window, t):
    q, k, v = _inputs(jax.random.key(window * 100 + t), t=t)
    np.testing.assert_allclose(banded_window_attention(q, k, v, window=window), _dense(q, k, v, window), atol=2e-6, rtol=2e-6)


def test_banded_window_attention_keeps_packed_documents_apart_and_has_the_same_gradients():
    q, k, v = _inputs(jax.random.key(1), t=40)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], 10, axis=1), jnp.int32)
    seg = seg.at[0, 33:].set(0)  # a padding tail
    np.testing.assert_allclose(
        banded_window_attention(q, k, v, window=6, q_segment_ids=seg, kv_segment_ids=seg), _dense(q, k, v, 6, seg), atol=2e-6, rtol=2e-6
    )
    w = jax.random.normal(jax.random.key(2), q.shape)
    banded = jax.grad(lambda *a: jnp.sum(w * banded_window_attention(*a, window=6, q_segment_ids=seg, kv_segment_ids=seg)), argnums=(0, 1, 2))
    dense = jax.grad(lambda *a: jnp.sum(w * _dense(*a, 6, seg)), argnums=(0, 1, 2))
    for gb, gd in zip(banded(q, k, v), dense(q, k, v)):
        assert np.all(np.isfinite(gb))
        np.testing.assert_allclose(gb, gd, atol=1e-5, rtol=1e-5)


def test_xla_attention_uses_the_banded_path_for_long_windowed_sequences():
    q, k, v = _inputs(jax.random.key(3), t=64)
    text = jax.jit(lambda q, k, v: xla_attention(q, k, v, window=8)).lower(q, k, v).as_text()
    assert "64x64" not in text.replace(" ", "")  # no [seq, seq] score matrix
    np.testing.assert_allclose(xla_attention(q, k, v, window=8), _dense(q, k, v, 8), atol=2e-6, rtol=2e-6)
