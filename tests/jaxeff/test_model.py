import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import Transformer, TransformerConfig, init_cache, init_params, logical_axes, xla_attention
from jaxeff.models.generate import generate


def small(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"use_bias": True, "tie_embeddings": False}, {"n_kv_heads": 1}, {"head_dim": 16}])
def test_param_count_matches_the_initialised_tree(kw):
    cfg = small(**kw)
    params = init_params(Transformer(cfg), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count()


def test_every_parameter_has_logical_axis_names():
    specs = logical_axes(Transformer(small(use_bias=True)))
    params = init_params(Transformer(small(use_bias=True)), jax.random.key(0))
    for spec, p in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)), jax.tree.leaves(params)):
        assert len(spec) == p.ndim and all(isinstance(n, str) for n in spec)


def test_hidden_states_are_returned_for_every_layer_on_request():
    cfg = small(n_layers=3)
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(0))
    toks = jnp.ones((2, 5), jnp.int32)
    out = m.apply({"params": p}, toks, return_hidden=True)
    assert out.logits.shape == (2, 5, 64)
    assert len(out.hidden_states) == cfg.n_layers + 1
    assert all(h.shape == (2, 5, 32) for h in out.hidden_states)
    assert m.apply({"params": p}, toks).hidden_states is None


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 4}, {"sliding_window": (None, 3)}, {"n_kv_heads": 1}, {"dtype": "bfloat16"}])
def test_cached_decoding_gives_the_same_logits_as_a_full_forward_pass(kw):
    cfg = small(**kw)
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    full = m.apply({"params": p}, toks).logits
    out = m.apply({"params": p}, toks[:, :6], cache=init_cache(cfg, 2, 20))
    logits, cache = [out.logits], out.cache
    for i in range(6, 13):  # one token at a time against the cache
        o = m.apply({"params": p}, toks[:, i : i + 1], cache=cache)
        logits.append(o.logits)
        cache = o.cache
    assert int(cache["index"]) == 13
    tol = 5e-2 if kw.get("dtype") == "bfloat16" else 1e-4
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full, atol=tol, rtol=tol)


def test_packed_segments_do_not_see_each_other():
    cfg = small()
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(0))
    a = jax.random.randint(jax.random.key(1), (1, 7), 0, 64)
    b = jax.random.randint(jax.random.key(2), (1, 5), 0, 64)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 7 + [2] * 5])
    pos = jnp.array([list(range(7)) + list(range(5))])
    out = m.apply({"params": p}, packed, positions=pos, segment_ids=seg).logits
    np.testing.assert_allclose(out[:, :7], m.apply({"params": p}, a).logits, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], m.apply({"params": p}, b).logits, atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    q = jax.random.normal(jax.random.key(0), (1, 10, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 10, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 10, 2, 8))
    base = xla_attention(q, k, v, causal=True, window=3)
    v2 = v.at[:, 5].set(100.0)  # position 5 is outside the window of queries >= 8
    changed = xla_attention(q, k, v2, causal=True, window=3)
    np.testing.assert_allclose(base[:, 8:], changed[:, 8:], atol=1e-6)
    assert not np.allclose(base[:, 5:8], changed[:, 5:8])


def test_attention_row_with_no_visible_key_is_zero_not_nan():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.ones((1, 2, 2, 4))
    seg_q, seg_k = jnp.array([[1, 2]]), jnp.array([[1, 1]])
    out = xla_attention(q, k, k, causal=False, q_segment_ids=seg_q, kv_segment_ids=seg_k)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0, 1], 0.0)


def test_greedy_generation_equals_repeated_argmax_of_full_forward_passes():
    cfg = small()
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(3))
    prompt = jnp.array([[5, 9, 11]], jnp.int32)
    new = generate(m, p, prompt, jax.random.key(0), max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        nxt = jnp.argmax(m.apply({"params": p}, seq).logits[:, -1], -1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(jnp.int32)], 1)
    np.testing.assert_array_equal(new, seq[:, 3:])


def test_top_k_sampling_only_draws_from_the_k_most_likely_tokens():
    from jaxeff.models.generate import sample_logits

    logits = jnp.tile(jnp.arange(10.0)[None], (500, 1))
    toks = sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=3)
    assert set(np.asarray(toks).tolist()) <= {7, 8, 9}
    assert len(set(np.asarray(toks).tolist())) == 3


@pytest.mark.parametrize(
    "kw,msg",
    [({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"), ({"sliding_window": (1, 2, 3)}, "one per layer"), ({"d_model": 30}, "not divisible")],
)
def test_impossible_architectures_are_rejected_with_the_reason(kw, msg):
    with pytest.raises(ValueError, match=msg):
        small(**kw)


@pytest.mark.parametrize("window", [None, 5])
def test_pallas_attention_gives_the_same_logits_and_gradients_as_xla(window):
    """The model with ``attention_impl: pallas`` (our kernel, interpret mode on CPU) against XLA,
    on packed segments, GQA and a sliding window."""
    cfg = small(sliding_window=window)
    xla, pallas = Transformer(cfg), Transformer(small(sliding_window=window, attention_impl="pallas"))
    p = init_params(xla, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 37), 0, 64)
    seg = jnp.array([[1] * 20 + [2] * 17, [1] * 37])
    pos = jnp.array([list(range(20)) + list(range(17)), list(range(37))])
    run = lambda m, p: m.apply({"params": p}, toks, positions=pos, segment_ids=seg).logits
    np.testing.assert_allclose(run(pallas, p), run(xla, p), atol=2e-5, rtol=1e-5)
    loss = lambda m: jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(run(m, p))[..., 3]))(p)
    for a, b in zip(jax.tree.leaves(loss(xla)), jax.tree.leaves(loss(pallas))):
        np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-4)


def test_pallas_decoding_against_the_cache_matches_the_full_forward_pass():
    cfg = small(attention_impl="pallas")
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)
    full = Transformer(small()).apply({"params": p}, toks).logits
    out = m.apply({"params": p}, toks[:, :8], cache=init_cache(cfg, 2, 16))
    step = m.apply({"params": p}, toks[:, 8:11], cache=out.cache)
    np.testing.assert_allclose(jnp.concatenate([out.logits, step.logits], 1), full, atol=2e-5, rtol=1e-5)


def test_pallas_attention_runs_per_shard_under_a_mesh_and_matches_xla():
    """XLA cannot partition a Pallas call: under the trainer's mesh it runs per device (batch over
    data/fsdp, heads over tensor) and must equal unsharded XLA attention, gradients included."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from jaxeff.models.attention import attention

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (4, 24, 4, 16))
    k = jax.random.normal(ks[1], (4, 24, 2, 16))
    v = jax.random.normal(ks[2], (4, 24, 2, 16))
    seg = jnp.array([[1] * 10 + [2] * 14] * 2 + [[1] * 24] * 2)
    f = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl=impl, causal=True, window=7, q_segment_ids=seg, kv_segment_ids=seg)))
    ref, ref_g = jax.value_and_grad(f("xla"), argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P(("data", "fsdp")))
        args = [jax.device_put(x, sh) for x in (q, k, v)]
        out, g = jax.jit(jax.value_and_grad(f("pallas"), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_qkv_bias_puts_biases_on_q_k_v_only():
    params = init_params(Transformer(small(qkv_bias=True)), jax.random.key(0))
    attn = params["layers_0"]["attn"]
    assert all("bias" in attn[n] for n in "qkv") and "bias" not in attn["o"]
    assert "bias" not in params["layers_0"]["mlp"]["up"]
    assert sum(x.size for x in jax.tree.leaves(params)) == small(qkv_bias=True).param_count()


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    from jaxeff.models.config import RopeScaling
    from jaxeff.models.transformer import rope_frequencies

    sc = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    base = np.asarray(rope_frequencies(32, 10000.0))
    scaled = np.asarray(rope_frequencies(32, 10000.0, sc))
    wavelen = 2 * np.pi / base
    hi, lo = wavelen < 64 / 4, wavelen > 64 / 1
    assert hi.any() and lo.any() and (~hi & ~lo).any()
    np.testing.assert_allclose(scaled[hi], base[hi], rtol=1e-6)
    np.testing.assert_allclose(scaled[lo], base[lo] / 8, rtol=1e-6)
    mid = ~hi & ~lo
    smooth = (64 / wavelen[mid] - 1.0) / 3.0
    np.testing.assert_allclose(scaled[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid], rtol=1e-5)


def test_a_long_prompt_prefilled_into_a_sliding_window_cache_gives_the_full_forward_logits():
    """Prefill from an empty cache takes the banded path (prompt >= 4 windows); a second chunk
    at index > 0 attends to the cache; both equal the uncached forward pass."""
    cfg = small(sliding_window=3)
    m = Transformer(cfg)
    p = init_params(m, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 30), 0, 64)
    full = m.apply({"params": p}, toks).logits
    apply = jax.jit(lambda t, c: m.apply({"params": p}, t, cache=c))
    first = apply(toks[:, :14], init_cache(cfg, 2, 32))
    second = apply(toks[:, 14:], first.cache)
    np.testing.assert_allclose(jnp.concatenate([first.logits, second.logits], 1), full, atol=1e-4, rtol=1e-4)
