"""TTT-E2E (method ttt_e2e): inner step, outer gradient, chunked scan, test-time updates, generation,
sharded training, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeff.ttt as ttt
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, init_params
from jaxeff.ttt import inner
from jaxeff.ttt.generate import decode_step, prefill
from jaxeff.ttt.method import evaluate_logits as _evaluate_logits
from jaxeff.ttt.model import FAST_KERNELS, TTTSpec, add_fast_params, empty_buffers, initial_fast_weights, suffix_forward

evaluate_logits = jax.jit(_evaluate_logits, static_argnums=(0,))
BASE = ["method=ttt_e2e", "model.n_layers=2", "model.sliding_window=8", "ttt.mini_batch=4", "data.seq_len=16", "model.init_std=0.2"]


def _setup(tiny_config, extra=(), seed=0):
    cfg = tiny_config(BASE + list(extra))
    spec = TTTSpec.from_config(cfg)
    key = jax.random.PRNGKey(seed)
    params = add_fast_params(spec, init_params(Transformer(cfg.model), key), jax.random.fold_in(key, 1))
    return cfg, spec, params


def _batch(rows, length, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (rows, length + 1)).astype(np.int32)
    pos = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    return (
        jnp.asarray(toks[:, :-1]),
        jnp.asarray(pos),
        jnp.ones((rows, length), jnp.int32),
        jnp.asarray(toks[:, 1:]),
        jnp.ones((rows, length), jnp.float32),
    )


def test_inner_step_equals_a_hand_written_clipped_sgd_step(tiny_config):
    cfg, spec, params = _setup(tiny_config, ["ttt.inner_clip=0.05", "ttt.inner_lr=0.7"])
    rows, b = 2, spec.mini_batch
    inputs, pos, seg, tgt, mask = _batch(rows, b, seed=1)
    mask = mask.at[1, 2].set(0.0)  # a masked token is left out of row 1's mean
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(rows, b, cfg.model.d_model)), jnp.float32)
    w0 = initial_fast_weights(spec, params, rows)
    # a different starting point per row: rows are separate sequences
    w0 = jax.tree.map(lambda a: a * jnp.asarray([1.0, 1.5]).reshape(2, 1, 1), w0)
    bufs = empty_buffers(spec, rows)
    w1, _, nll, _ = jax.jit(lambda *a: inner.inner_step(spec, params, *a, 0.7))(w0, bufs, x, pos, seg, tgt, mask)

    def loss_r(w, bufs_r, x_r, pos_r, seg_r, tgt_r, mask_r):  # one sequence: [1, ...] arrays
        logits, _ = suffix_forward(spec, params, w, bufs_r, x_r, pos_r, seg_r)
        logp = jax.nn.log_softmax(logits[0], -1)
        nll_r = -logp[jnp.arange(b), tgt_r[0]]
        return (nll_r * mask_r[0]).sum() / mask_r[0].sum()

    norms = []
    for r in range(rows):  # by hand, one sequence at a time
        sl = lambda a: a[r : r + 1]
        w_r = jax.tree.map(sl, w0)
        args = (jax.tree.map(sl, bufs), sl(x), sl(pos), sl(seg), sl(tgt), sl(mask))
        value, g = jax.jit(jax.value_and_grad(loss_r))(w_r, *args)
        g = jax.tree.map(np.asarray, g)
        norm = np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in jax.tree.leaves(g)))
        norms.append(norm)
        scale = min(1.0, 0.05 / norm)
        want = jax.tree.map(lambda a, ga: np.asarray(a) - 0.7 * scale * ga, w_r, g)
        got = jax.tree.map(sl, w1)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-7)
        row_mean = float((nll[r] * mask[r]).sum() / mask[r].sum())
        np.testing.assert_allclose(row_mean, float(value), rtol=1e-6)
    assert min(norms) > 0.05  # the clip was active in both rows (else this test would not pin it)
    assert set(w1) == {"layers_1"} and set(w1["layers_1"]) == set(FAST_KERNELS)


def _fd_setup(tiny_config, packed=False):
    cfg = tiny_config(
        [
            "method=ttt_e2e",
            "model.vocab_size=24",
            "model.d_model=8",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            "model.d_ff=16",
            "model.n_layers=1",
            "model.sliding_window=4",
            "model.init_std=0.3",
            "ttt.mini_batch=2",
            "data.seq_len=8",
            "ttt.fast_layers=[0]",
            "ttt.fast_d_ff=8",
            "ttt.inner_lr=0.5",
            "ttt.inner_clip=10.0",
        ]
    )
    spec = dataclasses.replace(TTTSpec.from_config(cfg), inner_dtype="float64", compute_dtype="float64")
    key = jax.random.PRNGKey(3)
    params = add_fast_params(spec, init_params(Transformer(cfg.model), key), jax.random.fold_in(key, 1))
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64) * rng.uniform(0.5, 1.5, a.shape)), params)
    inputs, pos, seg, tgt, mask = _batch(2, 8, seed=5, vocab=24)
    if packed:  # fast weights restart at a boundary inside a mini-batch (row 0) and on its edge (row 1)
        seg = seg.at[0, 3:].set(2).at[1, 4:].set(2)
        pos = pos.at[0, 3:].set(jnp.arange(5, dtype=jnp.int32)).at[1, 4:].set(jnp.arange(4, dtype=jnp.int32))
        mask = mask.at[0, 2].set(0.0).at[1, 3].set(0.0)

    def outer_loss(p):
        nll, _, _, _ = inner.forward(spec, p, inputs, pos, seg, tgt, mask.astype(jnp.float64), 0.5)
        return nll.mean()

    return params, outer_loss, rng


@pytest.mark.parametrize("packed", [False, True], ids=["one_document", "packed_rows"])
def test_outer_gradient_matches_finite_differences_in_float64(tiny_config, monkeypatch, packed):
    with jax.enable_x64(True):  # the brief's jax.experimental.enable_x64 is jax.enable_x64 in jax 0.11
        params, outer_loss, rng = _fd_setup(tiny_config, packed)
        grad = jax.jit(jax.grad(outer_loss))(params)
        loss_fn = jax.jit(outer_loss)
        eps = 1e-7  # central differences: truncation error ~1e-9 relative here (~1e-7 at eps=1e-6), rounding ~1e-9
        directions = [jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params) for _ in range(3)]
        fd, an = [], []
        for v in directions:
            plus = jax.tree.map(lambda a, d: a + eps * d, params, v)
            minus = jax.tree.map(lambda a, d: a - eps * d, params, v)
            fd.append((float(loss_fn(plus)) - float(loss_fn(minus))) / (2 * eps))
            an.append(sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v))))
        np.testing.assert_allclose(an, fd, rtol=1e-7, atol=1e-9)
        # the fast weights' initial values get an outer gradient too
        assert all(float(jnp.abs(grad["fast"][l][k]["kernel"]).max()) > 0 for l in grad["fast"] for k in FAST_KERNELS)

        # the check can tell a first-order shortcut (stop-gradient on the inner gradient) apart
        value_and_grad = jax.value_and_grad

        def first_order(*a, **k):
            f = value_and_grad(*a, **k)
            return lambda *x: (lambda out: (out[0], jax.lax.stop_gradient(out[1])))(f(*x))

        monkeypatch.setattr(inner.jax, "value_and_grad", first_order)
        grad_fo = jax.jit(jax.grad(outer_loss))(params)
        monkeypatch.undo()
        an_fo = [sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad_fo), jax.tree.leaves(v))) for v in directions]
        assert max(abs(a - f) for a, f in zip(an_fo, fd)) > 100 * 1e-7 * max(abs(f) for f in fd)


def test_chunked_scan_equals_an_unrolled_python_loop(tiny_config):
    cfg, spec, params = _setup(tiny_config)
    inputs, pos, seg, tgt, mask = _batch(2, 16, seed=6)
    seg = seg.at[0, 9:].set(2)  # two packed documents in row 0 (boundary inside a mini-batch)
    pos = pos.at[0, 9:].set(jnp.arange(7))
    mask = mask.at[0, 8].set(0.0)
    seg = seg.at[1, 4:].set(2).at[1, 6:].set(3)  # and in row 1: on a mini-batch edge, then a 2-token document
    pos = pos.at[1, 4:6].set(jnp.arange(2)).at[1, 6:].set(jnp.arange(10))
    mask = mask.at[1, 3].set(0.0).at[1, 5].set(0.0)
    run = jax.jit(lambda lr: inner.forward(spec, params, inputs, pos, seg, tgt, mask, lr))
    nll, _, w, _ = run(1.0)
    # the reference loop is unrolled in Python (jit only saves the op-by-op dispatch)
    nll_ref, w_ref = jax.jit(lambda: inner.unrolled_forward(spec, params, inputs, pos, seg, tgt, mask, 1.0))()
    np.testing.assert_allclose(np.asarray(nll), np.asarray(nll_ref), rtol=1e-5, atol=1e-6)
    for a, e in zip(jax.tree.leaves(w), jax.tree.leaves(w_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    # and the inner loop did something: later chunks differ from a run without updates
    nll0, _, _, _ = run(0.0)
    assert np.allclose(nll[:, :4], nll0[:, :4]) and not np.allclose(nll[:, 4:], nll0[:, 4:], atol=1e-4)


def test_with_inert_fast_mlps_it_is_the_sliding_window_transformer(tiny_config):
    cfg, spec, params = _setup(tiny_config, ["ttt.fast_layers=[1]", "model.n_layers=3", "ttt.inner_lr=0.0"])
    params["fast"]["layers_1"]["down"]["kernel"] = jnp.zeros_like(params["fast"]["layers_1"]["down"]["kernel"])
    inputs, pos, seg, _, _ = _batch(2, 16, seed=7)
    seg = seg.at[1, 6:].set(2)
    pos = pos.at[1, 6:].set(jnp.arange(10))
    got = evaluate_logits(spec, params, inputs, pos, seg)
    want = Transformer(cfg.model).apply({"params": params["model"]}, inputs, positions=pos, segment_ids=seg).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_only_fast_weights_change_at_test_time(tiny_config):
    cfg, spec, params = _setup(tiny_config, ["ttt.attention=none", "model.sliding_window=null", "ttt.mini_batch=2"])
    assert "attn" not in params["model"]["layers_0"]  # no self-attention at all: a bigram-like model
    tokens, *_ = _batch(1, 5, seed=8)  # 2 complete mini-batches with known targets, 1 pending token
    logits, state = jax.jit(prefill, static_argnums=(0,))(spec, params, tokens)
    adapted = ttt.adapted_params(params, state)
    changed = {
        jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(adapted)) if not np.array_equal(a, b)
    }
    want = {f"['fast']['layers_1']['{k}']['kernel']" for k in FAST_KERNELS}
    assert changed == want
    # the adapted tree is the whole test-time model: a static run of it (no inner steps) predicts the
    # pending token as the TTT run did
    static = dataclasses.replace(spec, inner_lr=0.0)
    got = evaluate_logits(static, adapted, tokens)
    np.testing.assert_allclose(np.asarray(got[:, -1]), np.asarray(logits[:, -1]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(evaluate_logits(static, params, tokens)[:, -1]), np.asarray(logits[:, -1]), atol=1e-4)


@pytest.mark.slow
def test_decoding_takes_one_inner_step_per_mini_batch_and_matches_the_full_sequence(tiny_config):
    cfg, spec, params = _setup(tiny_config, ["model.n_layers=3", "ttt.fast_layers=[2]"])
    tokens, *_ = _batch(2, 19, seed=9)
    full = evaluate_logits(spec, params, tokens)
    logits, state = jax.jit(lambda t: prefill(spec, params, t, max_len=19))(tokens[:, :6])
    steps = []
    step = jax.jit(lambda s, t: decode_step(spec, params, s, t))
    outs = [logits]
    for i in range(6, 19):
        before = state["fast"]
        lg, state = step(state, tokens[:, i])
        outs.append(lg[:, None])
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["fast"])))
        steps.append(not same)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-4, atol=1e-5)
    # b = 4: a step when tokens 8, 12, 16 arrive (completing mini-batches 4..7, 8..11, 12..15)
    assert [i for i, s in zip(range(6, 19), steps) if s] == [8, 12, 16]


def test_prefix_kv_caches_are_window_sized_rings_and_decoding_still_matches(tiny_config):
    cfg, spec, params = _setup(tiny_config, ["model.n_layers=3", "ttt.fast_layers=[2]"])
    tokens, *_ = _batch(1, 14, seed=13)
    logits, state = jax.jit(lambda t: prefill(spec, params, t, max_len=64))(tokens[:, :11])  # ring wrapped
    for c in state["prefix"]:  # window 8 slots, not max_len = 64
        assert c["k"].shape[1] == c["v"].shape[1] == 8
        assert sorted(np.asarray(c["pos"]).tolist()) == list(range(3, 11))
    step = jax.jit(lambda s, t: decode_step(spec, params, s, t))
    outs = [logits]
    for i in range(11, 14):
        lg, state = step(state, tokens[:, i])
        outs.append(lg[:, None])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(evaluate_logits(spec, params, tokens)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_generate_through_method_run_follows_the_teacher_forced_model(tiny_config):
    from jaxeff.models.generate import generate
    from jaxeff.train.methods import make_method

    cfg, spec, params = _setup(tiny_config)
    model = Transformer(cfg.model)
    method = make_method(cfg, model)
    prompt, *_ = _batch(1, 7, seed=10)
    new = generate(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=9, apply_fn=method.run)
    seq = jnp.concatenate([prompt, new], axis=1)
    greedy = jnp.argmax(method.run(model, params, seq).logits, -1)
    np.testing.assert_array_equal(np.asarray(greedy[0, 6:-1]), np.asarray(new[0]))


def test_token_losses_are_causal_and_match_the_training_loss(tiny_config):
    cfg, spec, params = _setup(tiny_config)
    tokens, *_ = _batch(2, 17, seed=11)
    full = np.asarray(ttt.token_losses(cfg, params, tokens))  # 16 losses = 4 mini-batches
    part = np.asarray(ttt.token_losses(cfg, params, tokens[:, :11]))  # 10 losses: last mini-batch padded
    assert full.shape == (2, 16) and part.shape == (2, 10)
    np.testing.assert_allclose(part, full[:, :10], rtol=1e-5, atol=1e-6)
    method = ttt.ttt_method(cfg, None)
    batch = dict(
        zip(("inputs", "positions", "segment_ids", "targets", "loss_mask"), (tokens[:, :-1], *_batch(2, 16)[1:3], tokens[:, 1:], jnp.ones((2, 16))))
    )
    loss, metrics = jax.jit(lambda p, bt: method.loss(p, bt, None, frozen=None, deterministic=True, step=jnp.asarray(10**6)))(params, batch)
    np.testing.assert_allclose(float(loss), full.mean(), rtol=1e-5)


def test_inner_learning_rate_warms_up_linearly(tiny_config):
    cfg = tiny_config(BASE + ["train.steps=100", "ttt.inner_lr=2.0", "ttt.inner_lr_warmup_from=0.1", "ttt.inner_lr_warmup_fraction=0.2"])
    got = [float(ttt.inner_lr_at(cfg, s)) for s in (0, 10, 20, 60)]
    np.testing.assert_allclose(got, [0.2, 1.1, 2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["ttt.mini_batch=16"], "ttt.mini_batch"),  # larger than the window of 8
        (["ttt.mini_batch=3"], "ttt.mini_batch"),  # does not divide seq_len=16
        (["ttt.fast_layers=[2]"], "ttt.fast_layers"),  # 2 blocks: 0..1
        (["model.sliding_window=null"], "model.sliding_window"),
        (["model.dropout=0.1"], "model.dropout"),
    ],
)
def test_bad_ttt_config_is_a_one_line_error_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ConfigError) as e:
        TTTSpec.from_config(tiny_config(BASE + overrides))
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_cli_train_with_a_bad_ttt_config_exits_2(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main

    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(BASE).to_dict()))
    assert main(["train", str(path), "ttt.mini_batch=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ttt.mini_batch")


@pytest.mark.slow
def test_sharded_ttt_train_step_on_8_devices_matches_one_device(tiny_config):
    from jaxeff.train.loop import Trainer

    # plain SGD: Adam's first step (~lr * sign(g)) would magnify rounding differences of tiny gradients
    over = BASE + [
        "model.n_layers=2",
        "data.batch_size=8",
        "model.init_std=0.02",
        "optim.warmup_steps=0",
        "optim.name=sgd",
        "optim.lr=1.0",
        "optim.grad_clip=null",
    ]
    cfg8 = tiny_config(over + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    cfg1 = tiny_config(over + ["mesh.data=1"])
    inputs, pos, seg, tgt, mask = _batch(8, 16, seed=12)
    batch = {"inputs": inputs, "positions": pos, "segment_ids": seg, "targets": tgt, "loss_mask": mask}
    batch = jax.tree.map(np.asarray, batch)
    results = []
    for cfg, devices in ((cfg8, jax.devices()[:8]), (cfg1, jax.devices()[:1])):
        tr = Trainer(cfg, devices=devices)
        state, metrics = tr.train_step(tr.init_state(), batch)
        results.append((metrics, jax.device_get(state.params)))
    (m8, p8), (m1, p1) = results
    for k in ("loss", "grad_norm", "ttt/last_chunk_loss"):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # params moved by the gradient itself
    assert np.isfinite(float(m8["loss"]))
