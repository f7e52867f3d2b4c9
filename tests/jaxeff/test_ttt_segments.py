"""TTT-E2E on packed rows: the fast weights restart at every segment (document), so no information
from one document reaches another's predictions through them -- in training (the method's loss),
evaluation (``evaluate_logits``) and the chunked loop's unrolled reference; single-document rows
are computed exactly as before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeff.ttt as ttt
from jaxeff.models import Transformer, init_params
from jaxeff.ttt import inner
from jaxeff.ttt.method import evaluate_logits as _evaluate_logits
from jaxeff.ttt.model import TTTSpec, add_fast_params

evaluate_logits = jax.jit(_evaluate_logits, static_argnums=(0,))
BASE = ["method=ttt_e2e", "model.n_layers=2", "model.sliding_window=8", "ttt.mini_batch=4", "data.seq_len=16", "model.init_std=0.2"]
T, B = 16, 4  # row length, mini-batch


def _setup(tiny_config, extra=()):
    cfg = tiny_config(BASE + list(extra))
    spec = TTTSpec.from_config(cfg)
    key = jax.random.PRNGKey(0)
    params = add_fast_params(spec, init_params(Transformer(cfg.model), key), jax.random.fold_in(key, 1))
    return cfg, spec, params


def _row(docs, offset=0):
    """One row [T] holding ``docs`` (token lists) end to end after ``offset`` padding tokens: inputs,
    positions, segment ids (1, 2, ...; 0 = padding), next-token targets and loss mask (0 at a
    document's last token and on padding)."""
    inp, pos, seg, tgt, mask = ([0] * offset for _ in range(5))
    for s, d in enumerate(docs, start=1):
        inp += d
        pos += list(range(len(d)))
        seg += [s] * len(d)
        tgt += d[1:] + [0]
        mask += [1] * (len(d) - 1) + [0]
    pad = T - len(inp)
    assert pad >= 0
    return [np.asarray(a + [0] * pad) for a in (inp, pos, seg, tgt, mask)]


def _forward(spec, params, rows):
    inp, pos, seg, tgt, mask = (jnp.asarray(np.stack(a)) for a in zip(*rows))
    nll, _, _, _ = jax.jit(lambda *a: inner.forward(spec, params, *a, spec.inner_lr))(inp, pos, seg, tgt, mask.astype(jnp.float32))
    logits = evaluate_logits(spec, params, inp, pos, seg)
    return np.asarray(nll), np.asarray(logits)


@pytest.mark.parametrize("lengths", [(8, 8), (6, 10), (5, 2, 9)], ids=["boundary_on_a_chunk_edge", "boundary_inside_a_chunk", "short_doc_inside_a_chunk"])
def test_each_packed_document_is_predicted_as_if_it_were_alone(tiny_config, lengths):
    cfg, spec, params = _setup(tiny_config)
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 64, n)) for n in lengths]
    # alone: the document in its own row, at the same offset within its mini-batch (padding before it)
    starts = np.cumsum((0,) + lengths[:-1])
    rows = [_row(docs)] + [_row([d], offset=int(s) % B) for d, s in zip(docs, starts)]
    nll, logits = _forward(spec, params, rows)
    for j, (d, s) in enumerate(zip(docs, starts)):
        packed = slice(s, s + len(d))
        alone = slice(s % B, s % B + len(d))
        np.testing.assert_allclose(nll[0, packed], nll[1 + j, alone], rtol=1e-5, atol=1e-6, err_msg=f"doc {j}")
        np.testing.assert_allclose(logits[0, packed], logits[1 + j, alone], rtol=1e-5, atol=1e-5, err_msg=f"doc {j}")
    # and the later documents are not trivially predicted: the inner loop changed their losses
    static, _ = _forward(dataclasses_replace(spec, inner_lr=0.0), params, rows[:1])
    assert not np.allclose(static[0, starts[-1] + B :], nll[0, starts[-1] + B :], atol=1e-4)


def dataclasses_replace(spec, **kw):
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_single_document_rows_are_computed_exactly_as_without_segments(tiny_config):
    cfg, spec, params = _setup(tiny_config)
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(3, 64, (3, T + 1)), jnp.int32)
    inp, tgt = toks[:, :-1], toks[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, T))
    ones = jnp.ones((3, T), jnp.int32)
    mask = jnp.ones((3, T), jnp.float32)
    run = jax.jit(lambda p, segments: inner.forward(spec, p, inp, pos, ones, tgt, mask, 1.0, segments=segments)[0], static_argnames="segments")
    np.testing.assert_array_equal(np.asarray(run(params, True)), np.asarray(run(params, False)))
    # token_losses (the studies' API: one document per row) is the same computation
    np.testing.assert_array_equal(np.asarray(ttt.token_losses(cfg, params, toks)), np.asarray(run(params, False)))
    # the outer gradient goes through a lax.cond: the same up to float rounding (not bit for bit)
    grads = [jax.jit(jax.grad(lambda p, s=s: run(p, s).mean()))(params) for s in (True, False)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_training_loss_on_packed_rows_has_finite_gradients_and_matches_the_reference(tiny_config):
    cfg, spec, params = _setup(tiny_config)
    rng = np.random.default_rng(2)
    rows = [_row([list(rng.integers(3, 64, n)) for n in lengths]) for lengths in ((6, 10), (5, 2, 9), (16,), (3, 4))]
    inp, pos, seg, tgt, mask = (jnp.asarray(np.stack(a)) for a in zip(*rows))
    batch = {"inputs": inp, "positions": pos, "segment_ids": seg, "targets": tgt, "loss_mask": mask}
    method = ttt.ttt_method(cfg, None)

    def loss(p):
        return method.loss(p, batch, None, frozen=None, deterministic=True, step=jnp.asarray(10**6))[0]

    value, grad = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
    assert all(float(jnp.abs(grad["fast"]["layers_1"][k]["kernel"]).max()) > 0 for k in ttt.FAST_KERNELS)
    ref, _ = jax.jit(lambda p: inner.unrolled_forward(spec, p, inp, pos, seg, tgt, mask.astype(jnp.float32), 1.0))(params)
    np.testing.assert_allclose(float(value), float((ref * mask).sum() / mask.sum()), rtol=1e-5)
