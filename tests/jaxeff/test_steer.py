"""jaxeff.steer: activation addition on a small random model; the generate CLI's steering options."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.errors import JaxeffError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.models.generate import generate
from jaxeff.steer import load_vector, record, save_vector, steer_generate, steered_forward

CFG = TransformerConfig(vocab_size=264, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=True)
POS = [[1, 10, 11, 12, 13], [1, 10, 11]]
NEG = [[1, 20, 21, 22]]


@pytest.fixture(scope="module")
def model():
    m = Transformer(CFG)
    return m, jax.jit(lambda: init_params(m, jax.random.key(0), (1, 8)))()


def _hidden(m, params, ids):
    return jax.jit(lambda p, x: m.apply({"params": p}, x, return_hidden=True).hidden_states)(params, jnp.asarray([ids], jnp.int32))


def test_the_vector_is_the_mean_residual_difference_after_the_block(model):
    m, params = model
    layer = 1
    pos_means = [np.mean(np.asarray(_hidden(m, params, ids)[layer + 1][0, 1:]), axis=0) for ids in POS]
    neg_mean = np.mean(np.asarray(_hidden(m, params, NEG[0])[layer + 1][0, 1:]), axis=0)
    expected = (pos_means[0] + pos_means[1]) / 2 - neg_mean
    v = record(m, params, POS, NEG, layer)
    assert v.shape == (32,) and float(jnp.linalg.norm(v)) > 1e-3
    np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)


def test_steering_adds_scale_times_the_vector_after_the_chosen_block_only(model):
    m, params = model
    v = jax.random.normal(jax.random.key(1), (32,))
    ids = jnp.asarray([[1, 5, 6, 7]], jnp.int32)
    plain = m.apply({"params": params}, ids, return_hidden=True).hidden_states
    steered = steered_forward(m, params, ids, vector=v, layer=1, scale=2.5, return_hidden=True).hidden_states
    np.testing.assert_allclose(steered[0], plain[0], rtol=1e-6, atol=1e-7)  # (jit vs eager: float rounding only)
    np.testing.assert_allclose(steered[1], plain[1], rtol=1e-6, atol=1e-7)  # before block 1
    np.testing.assert_allclose(steered[2], plain[2] + 2.5 * v, rtol=1e-6, atol=1e-6)  # every position
    assert float(jnp.max(jnp.abs(steered[3] - plain[3] - 2.5 * v))) > 1e-4  # later blocks see the shift


def test_scale_zero_is_plain_generation(model):
    m, params = model
    prompt = jnp.asarray([[1, 5, 6, 7]], jnp.int32)
    v = record(m, params, POS, NEG, 2)
    plain = generate(m, params, prompt, jax.random.key(3), max_new_tokens=6)
    steered = steer_generate(m, params, prompt, jax.random.key(3), vector=v, layer=2, scale=0.0, max_new_tokens=6)
    np.testing.assert_array_equal(steered, plain)
    np.testing.assert_array_equal(
        steered_forward(m, params, prompt, vector=v, layer=2, scale=0.0).logits, jax.jit(lambda p, x: m.apply({"params": p}, x).logits)(params, prompt)
    )


def test_cached_generation_is_steered_at_every_step(model):
    """Greedy tokens from the KV-cache path equal greedy decoding by full steered forward passes."""
    m, params = model
    v = 3.0 * jax.random.normal(jax.random.key(2), (32,)) / np.sqrt(32)
    prompt = [1, 5, 6, 7]
    got = np.asarray(steer_generate(m, params, jnp.asarray([prompt]), jax.random.key(0), vector=v, layer=0, scale=1.0, max_new_tokens=6))[0].tolist()
    seq = np.zeros((1, len(prompt) + 6), np.int32)  # causal: right padding changes no earlier logits
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + 6):
        logits = steered_forward(m, params, seq, vector=v, layer=0, scale=1.0).logits
        seq[0, t] = int(jnp.argmax(logits[0, t - 1]))
    assert got == seq[0, len(prompt) :].tolist()
    plain = np.asarray(generate(m, params, jnp.asarray([prompt]), jax.random.key(0), max_new_tokens=6))[0].tolist()
    assert got != plain  # the steering changed the output


def test_steering_shifts_the_next_token_toward_the_positive_prompts_continuation(model):
    """Constructed example: the positive prompt repeats token 'a', the negative one token 'b'. In a
    fresh model with tied embeddings the residual stream is dominated by the token embedding, so
    v ~ E[a] - E[b] after the last block, and adding it raises log p(a) and lowers log p(b) of the
    next token, more with a larger scale."""
    m, params = model
    a, b = ord("a") + 3, ord("b") + 3
    v = record(m, params, [[1] + [a] * 6], [[1] + [b] * 6], 2)
    ids = jnp.asarray([[1, 40, 41, 42, 43]], jnp.int32)
    lp = lambda s: jax.nn.log_softmax(steered_forward(m, params, ids, vector=v, layer=2, scale=s).logits[0, -1])
    runs = [lp(s) for s in (0.0, 1.0, 2.0, 4.0)]
    pa, pb = [float(r[a]) for r in runs], [float(r[b]) for r in runs]
    assert all(x < y for x, y in zip(pa, pa[1:])), pa
    assert all(x > y for x, y in zip(pb, pb[1:])), pb
    assert int(jnp.argmax(runs[-1])) == a


def test_bad_layer_vector_and_prompts_are_one_line_errors(model, tmp_path):
    m, params = model
    with pytest.raises(JaxeffError, match=r"^layer: expected a block index in 0..2 \(got 3\)$"):
        record(m, params, POS, NEG, 3)
    with pytest.raises(JaxeffError, match="^layer: .*got -1"):
        steered_forward(m, params, jnp.ones((1, 3), jnp.int32), vector=jnp.zeros(32), layer=-1, scale=1.0)
    with pytest.raises(JaxeffError, match=r"steering vector: shape \(16,\), expected \(32,\)"):
        steered_forward(m, params, jnp.ones((1, 3), jnp.int32), vector=jnp.zeros(16), layer=0, scale=1.0)
    with pytest.raises(JaxeffError, match=r"neg\[0\]: a prompt needs at least one token after BOS"):
        record(m, params, POS, [[1]], 0)
    with pytest.raises(JaxeffError, match="^pos: expected at least one prompt"):
        record(m, params, [], NEG, 0)


def test_vector_file_round_trip_and_bad_files(tmp_path):
    v = np.arange(32, dtype=np.float32)
    save_vector(tmp_path / "v.npz", v, layer=2, pos=["x"], neg=["y"], run="runs/r")
    back, meta = load_vector(tmp_path / "v.npz")
    np.testing.assert_array_equal(back, v)
    assert meta["layer"] == 2 and meta["pos"] == ["x"] and meta["d_model"] == 32
    with pytest.raises(JaxeffError, match="^--steer-vector: '.*nope.npz' does not exist"):
        load_vector(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(JaxeffError, match="is not a steering vector file"):
        load_vector(tmp_path / "junk.npz")


# ------------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    """A run folder holding the fixture's model (no training)."""
    from conftest import TINY
    from jaxeff.config import from_dict
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer
    from jaxeff.train.step import init_state

    root = tmp_path_factory.mktemp("steer")
    raw = json.loads(json.dumps(TINY))
    raw.update(name="r", logging={"run_dir": str(root), "progress": False})
    raw["model"].update(n_layers=3, tie_embeddings=True)
    cfg = from_dict(raw)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    ckpt = Checkpointer(cfg.checkpoint_path)
    ckpt.save(0, init_state(model[1], trainer.tx, trainer.method, 0), data_state={}, config=cfg.to_dict())
    ckpt.close()
    return root / "r"


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--steer-pos", "aaa", "--steer-neg", "bbb", "--steer-layer", "3"], "--steer-layer: expected a block index in 0..2 (got 3)"),
        (["--steer-pos", "aaa", "--steer-layer", "1"], "--steer-pos/--steer-neg: steering needs both"),
        (["--steer-pos", "aaa", "--steer-neg", "bbb"], "--steer-layer: required"),
        (["--steer-vector", "nope.npz"], "--steer-vector: 'nope.npz' does not exist"),
        (["--steer-vector", "v.npz", "--steer-pos", "a"], "not both"),
    ],
)
def test_cli_steering_mistakes_are_one_line_exit_2(run_dir, capsys, extra, expected):
    from jaxeff.cli import main

    code = main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--max-new-tokens", "2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.slow
def test_cli_steered_generation_with_scale_zero_prints_the_plain_text_and_a_saved_vector_is_used(run_dir, tmp_path, capsys):
    from jaxeff.cli import main

    base = ["generate", "--checkpoint", str(run_dir), "--prompt", "x=", "--max-new-tokens", "4"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--steer-pos", "aaaa", "--steer-neg", "bbbb", "--steer-layer", "2", "--steer-scale", "0"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["steer-vector", "--checkpoint", str(run_dir), "--pos", "aaaa", "--neg", "bbbb", "--layer", "2", "--out", str(tmp_path / "v.npz")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(base + ["--steer-vector", str(tmp_path / "v.npz"), "--steer-scale", "40"]) == 0
    assert capsys.readouterr().out.startswith("x=a")  # a large push toward 'a' (the constructed example above)


def test_a_rematerialized_block_is_steered_too():
    cfg = TransformerConfig(vocab_size=264, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16, remat=True)
    m = Transformer(cfg)
    params = jax.jit(lambda: init_params(m, jax.random.key(0), (1, 8)))()
    ids, v = jnp.ones((1, 4), jnp.int32), jnp.arange(16, dtype=jnp.float32)
    h = lambda s: steered_forward(m, params, ids, vector=v, layer=1, scale=s, return_hidden=True).hidden_states[2]
    np.testing.assert_allclose(h(0.5) - h(0.0), jnp.broadcast_to(0.5 * v, (1, 4, 16)), atol=1e-5)
