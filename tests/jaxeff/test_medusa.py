"""Medusa heads: greedy Medusa decoding equals the model's greedy decoding token for token (random
and trained heads, several prompts, several trees), tree attention equals running each candidate
path as a plain sequence, zero-initialised blocks are the identity, typical acceptance, the
method (only the heads train in Medusa-1), the CLI and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.decode.medusa import MedusaConfig, Tree, accept_tree, final_hidden, head_hidden, head_logits, heads_loss, init_heads, medusa_generate
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.models.generate import generate
from jaxeff.models.transformer import init_cache, tree_attention_mask

# init_std 0.5: peaked, input-dependent distributions (the default 0.02 gives near-uniform logits)
CFG = TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256, init_std=0.5)
PROMPTS = [
    jnp.array([[3, 1, 4, 1, 5]], jnp.int32),
    jnp.array([[9, 2, 6, 5, 3]], jnp.int32),
    jnp.array([[7, 7, 1, 8, 2]], jnp.int32),
]  # one length: one compile per decoder setting
NEW = 40


@pytest.fixture(scope="module")
def model():
    m = Transformer(CFG)
    return m, init_params(m, jax.random.key(0))


@pytest.fixture(scope="module")
def references(model):
    m, params = model
    return [np.asarray(generate(m, params, p, jax.random.key(0), max_new_tokens=NEW)) for p in PROMPTS]


def _random_heads(params, n_heads=3, scale=0.3, seed=1):
    heads = init_heads(CFG, params, n_heads)
    keys = jax.random.split(jax.random.key(seed), len(heads))
    return {k: v + scale * jax.random.normal(kk, v.shape) for (k, v), kk in zip(sorted(heads.items()), keys)}


def _train_heads(model, references, n_heads=3, steps=60):
    """Heads trained (Medusa-1 loss, Adam) on the model's own greedy continuations of the test
    prompts: they learn to predict its output, so many candidates are accepted and whole paths are
    moved in the KV cache."""
    m, params = model
    seqs = jnp.concatenate([jnp.concatenate([p, jnp.asarray(r)], 1) for p, r in zip(PROMPTS, references)])
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    h = final_hidden(m, params, m.apply({"params": params}, inputs, return_hidden=True).hidden_states)
    data = (h, targets, jnp.ones(targets.shape, jnp.float32), jnp.ones(targets.shape, jnp.int32))
    heads = init_heads(CFG, params, n_heads)
    opt = optax.adam(3e-2)

    def loss_fn(hd):
        return heads_loss(hd, *data, 0.8)[0]

    @jax.jit
    def step(heads, state):
        grads = jax.grad(loss_fn)(heads)
        upd, state = opt.update(grads, state)
        return optax.apply_updates(heads, upd), state

    state = opt.init(heads)
    for _ in range(steps):
        heads, state = step(heads, state)
    return heads


@pytest.fixture(scope="module")
def trained_heads(model, references):
    return _train_heads(model, references)


# ------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize(
    "heads_kind,top_k",
    [
        ("random", (3, 2, 2)),
        ("trained", (3, 2, 2)),
        ("trained", (1, 1, 1)),
        pytest.param("zero", (4, 2), marks=pytest.mark.slow),
        pytest.param("trained", (5, 3, 1), marks=pytest.mark.slow),
    ],
)
def test_greedy_medusa_output_equals_the_models_greedy_output(model, references, trained_heads, heads_kind, top_k):
    m, params = model
    heads = {"random": lambda: _random_heads(params), "trained": lambda: trained_heads, "zero": lambda: init_heads(CFG, params, 2)}[heads_kind]()
    tree = Tree.cartesian(top_k)
    lengths = []
    for prompt, ref in zip(PROMPTS, references):
        out, st = medusa_generate(m, params, heads, prompt, jax.random.key(0), tree=tree, max_new_tokens=NEW)
        np.testing.assert_array_equal(np.asarray(out), ref)
        st = {k: float(v) for k, v in st.items()}
        assert st["generated"] == st["accepted"] + st["calls"] and st["generated"] >= NEW
        assert st["acceptance_length"] == pytest.approx(st["generated"] / st["calls"])
        assert 1.0 <= st["acceptance_length"] <= tree.max_depth + 1
        lengths.append(st["acceptance_length"])
    if heads_kind == "trained":  # candidates accepted: whole paths moved in the cache, not only the root
        assert np.mean(lengths) > 1.5, lengths


def test_trained_heads_accept_more_than_random_heads(model, trained_heads):
    m, params = model
    tree = Tree.cartesian((3, 2, 2))
    got = {}
    for name, heads in (("random", _random_heads(params)), ("trained", trained_heads)):
        got[name] = np.mean(
            [float(medusa_generate(m, params, heads, p, jax.random.key(0), tree=tree, max_new_tokens=NEW)[1]["acceptance_length"]) for p in PROMPTS]
        )
    assert got["trained"] > got["random"] + 0.3, got


# ------------------------------------------------------------------------------------------------
# tree attention


def test_tree_attention_mask_against_a_dense_construction():
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    a = tree.arrays
    n = tree.n_nodes
    assert a["depth"].tolist() == [0, 1, 1, 2, 2, 2, 3]
    # ancestor-or-self, by walking parents
    dense = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while True:
            dense[i, j] = True
            if j == 0:
                break
            j = a["parent"][j]
    np.testing.assert_array_equal(a["mask"], dense)
    index, kv_len = 5, 16
    full = np.asarray(tree_attention_mask(jnp.asarray(a["mask"]), jnp.int32(index), kv_len))
    expect = np.zeros((n, kv_len), bool)
    expect[:, :index] = True
    expect[:, index : index + n] = dense
    np.testing.assert_array_equal(full, expect)


def test_tree_pass_equals_each_candidate_path_run_as_a_plain_sequence(model):
    """One cached pass over the tree with tree attention gives, at every node, the logits of the
    model on prompt + that node's path, run causally with no cache (the dense reference)."""
    m, params = model
    tree = Tree.cartesian((2, 2, 2))
    a = tree.arrays
    prompt = PROMPTS[0]
    tokens = jax.random.randint(jax.random.key(3), (tree.n_nodes,), 0, CFG.vocab_size)
    index = prompt.shape[1]

    @jax.jit
    def tree_pass(tokens):
        cache = m.apply({"params": params}, prompt, cache=init_cache(CFG, 1, 32)).cache
        return m.apply({"params": params}, tokens[None], positions=(index + a["depth"])[None], cache=cache, tree_mask=jnp.asarray(a["mask"]))

    out = tree_pass(tokens)
    plain = jax.jit(lambda seq: m.apply({"params": params}, seq).logits[0, -1])  # one compile per path length
    for node in range(tree.n_nodes):
        path = a["path"][node][: a["depth"][node] + 1]
        seq = jnp.concatenate([prompt, tokens[path][None]], axis=1)
        ref = plain(seq)
        np.testing.assert_allclose(np.asarray(out.logits[0, node]), np.asarray(ref), atol=2e-4, rtol=2e-4)
    assert int(out.cache["index"]) == index + tree.n_nodes


def test_tree_mask_needs_a_cache_and_full_attention(model):
    m, params = model
    mask = jnp.ones((2, 2), bool)
    with pytest.raises(ValueError, match="tree_mask: needs a KV cache"):
        m.apply({"params": params}, jnp.zeros((1, 2), jnp.int32), tree_mask=mask)
    windowed = Transformer(TransformerConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, sliding_window=4))
    wp = init_params(windowed, jax.random.key(0))
    with pytest.raises(ValueError, match="sliding-window"):
        windowed.apply({"params": wp}, jnp.zeros((1, 2), jnp.int32), cache=init_cache(windowed.config, 1, 8), tree_mask=mask)


# ------------------------------------------------------------------------------------------------
# heads


def test_zero_initialised_blocks_are_the_identity_and_heads_start_as_the_lm_head(model):
    m, params = model
    heads = init_heads(CFG, params, n_heads=3, n_layers=2)
    h = jax.random.normal(jax.random.key(4), (2, 5, CFG.d_model))
    x = head_hidden(heads, h)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(h))
    out = m.apply({"params": params}, PROMPTS[0], return_hidden=True)
    hidden = final_hidden(m, params, out.hidden_states)
    logits = head_logits(heads, hidden)
    for k in range(3):  # every head starts as the LM head on the same hidden state
        np.testing.assert_allclose(np.asarray(logits[k]), np.asarray(out.logits), atol=1e-5, rtol=1e-5)


def test_heads_loss_targets_are_shifted_per_head_and_stay_inside_documents():
    heads = init_heads(CFG, {"embed": {"embedding": jnp.eye(CFG.vocab_size, CFG.d_model)}}, n_heads=2)
    # hidden = one-hot of token 7 everywhere: logits favour token 7; targets 7 only where head 0 must look
    h = jnp.broadcast_to(jnp.eye(CFG.d_model)[7], (1, 6, CFG.d_model)) * 20
    targets = jnp.array([[1, 7, 7, 7, 7, 1]])
    valid = jnp.ones((1, 6))
    seg = jnp.array([[1, 1, 1, 1, 2, 2]])
    _, metrics = heads_loss(heads, h, targets, valid, seg, 0.8)
    # head 0 at i predicts targets[i+1]; inside a document: i = 0, 1, 2, 4 (targets 7, 7, 7, 1)
    assert float(metrics["medusa/top1_0"]) == pytest.approx(3 / 4)
    # head 1 at i predicts targets[i+2]; inside a document: i = 0, 1 (targets 7, 7); i = 2, 3 cross into document 2
    assert float(metrics["medusa/top1_1"]) == 1.0
    _, metrics = heads_loss(heads, h, targets, valid, jnp.ones((1, 6), jnp.int32), 0.8)  # one document
    assert float(metrics["medusa/top1_0"]) == pytest.approx(4 / 5)
    assert float(metrics["medusa/top1_1"]) == pytest.approx(3 / 4)


# ------------------------------------------------------------------------------------------------
# acceptance


def test_typical_acceptance_keeps_likely_tokens_and_picks_the_deepest_path():
    tree = Tree.from_choices([[0], [1], [0, 0]])  # nodes: root, (0), (1), (0, 0)
    v = 4
    logits = jnp.full((4, v), -10.0)
    logits = logits.at[0, 2].set(5.0).at[0, 3].set(5.0)  # after the root: tokens 2 and 3 equally likely
    logits = logits.at[1, 1].set(5.0)  # after node (0) [token 2]: token 1
    tokens = jnp.array([0, 2, 3, 1])
    node, depth = accept_tree(tokens, logits, tree, temperature=1.0)
    assert (int(node), int(depth)) == (3, 2)  # root -> 2 -> 1
    node, depth = accept_tree(tokens.at[3].set(0), logits, tree, temperature=1.0)  # token 0 unlikely after 2
    assert int(depth) == 1 and int(node) in (1, 2)
    node, depth = accept_tree(tokens, logits, tree)  # greedy: argmax after the root is token 2 (first max)
    assert (int(node), int(depth)) == (3, 2)


def test_sampled_medusa_decoding_runs_and_depends_on_the_seed(model, trained_heads):
    m, params = model
    kw = dict(tree=Tree.cartesian((3, 2, 2)), max_new_tokens=NEW, temperature=1.0)
    a, st = medusa_generate(m, params, trained_heads, PROMPTS[0], jax.random.key(0), **kw)
    b, _ = medusa_generate(m, params, trained_heads, PROMPTS[0], jax.random.key(1), **kw)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert int(st["generated"]) >= NEW and float(st["acceptance_length"]) >= 1.0
    assert ((np.asarray(a) >= 0) & (np.asarray(a) < CFG.vocab_size)).all()


# ------------------------------------------------------------------------------------------------
# config and errors


def test_trees_and_their_errors():
    assert Tree.cartesian((4, 2, 2)).n_nodes == 1 + 4 + 8 + 16
    assert Tree.cartesian((1, 1, 1)).max_depth == 3
    with pytest.raises(ConfigError, match=r"medusa.tree: path \[0, 1\] needs its parent \[0\]"):
        MedusaConfig(tree=((1,), (0, 1))).make_tree()
    with pytest.raises(ConfigError, match="medusa.top_k: the tree is 3 deep but there are only medusa.n_heads=2"):
        MedusaConfig(n_heads=2).make_tree()
    with pytest.raises(ValueError, match="top_k"):
        MedusaConfig(top_k=(2, 0))


def test_decoder_refuses_batches_and_too_deep_trees(model):
    m, params = model
    heads = init_heads(CFG, params, 2)
    with pytest.raises(ConfigError, match="batch 1"):
        medusa_generate(m, params, heads, jnp.zeros((2, 3), jnp.int32), jax.random.key(0), tree=Tree.cartesian((2,)), max_new_tokens=4)
    with pytest.raises(ConfigError, match="3 deep but the run has 2 Medusa heads"):
        medusa_generate(m, params, heads, PROMPTS[0], jax.random.key(0), tree=Tree.cartesian((2, 2, 2)), max_new_tokens=4)


# ------------------------------------------------------------------------------------------------
# the method and the command line


def _flat(tree):
    from flax import traverse_util

    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _train_steps(cfg, n=2):
    from jaxeff.train.inputs import build_data
    from jaxeff.train.runtime import Trainer

    trainer = Trainer(cfg)
    state = trainer.init_state()
    before = _flat(state.params)
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    for _ in range(n):
        state, metrics = trainer.train_step(state, loader.next_batch())
    return before, _flat(state.params), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("mode", ["medusa1", pytest.param("medusa2", marks=pytest.mark.slow)])
def test_training_steps_change_only_the_heads_in_medusa1_and_also_the_backbone_in_medusa2(tiny_config, mode):
    lr = ["medusa.heads_lr_multiplier=4"] if mode == "medusa2" else []  # Medusa-2's differential learning rates
    cfg = tiny_config(["method=medusa", "medusa.n_heads=2", "medusa.top_k=[2,2]", f"medusa.mode={mode}", *lr])
    before, after, metrics = _train_steps(cfg)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    heads = {k for k in before if k.startswith("medusa/")}
    assert heads == {"medusa/w", "medusa/b", "medusa/proj"} and heads <= changed
    if mode == "medusa1":
        assert changed == heads
    else:
        assert changed - heads and all(k.startswith("model/") for k in changed - heads)
        # Adam's first updates are ~ lr x sign(gradient): the heads' steps are 4x the backbone's
        step = {k: np.abs(after[k] - before[k]).max() for k in ("medusa/w", "model/layers_0/mlp/up/kernel")}
        assert 3.0 < step["medusa/w"] / step["model/layers_0/mlp/up/kernel"] < 5.0, step
    assert {"ce", "medusa/ce_0", "medusa/ce_1", "medusa/top1_0", "medusa/heads_loss"} <= set(metrics)
    if mode == "medusa1":
        assert metrics["loss"] == pytest.approx(metrics["medusa/ce_0"] + 0.8 * metrics["medusa/ce_1"], rel=1e-5)


@pytest.mark.slow
def test_cli_generate_and_the_acceptance_length_metric_on_a_trained_run(tiny_config, capsys):
    """A base run, Medusa-1 heads trained from it (train.init_from), then ``generate --medusa``: its
    greedy text equals plain greedy generation with the base; the eval metric reads the same run."""
    import argparse

    from jaxeff.decode.medusa_cli import acceptance_length_metric, cmd_generate_medusa, load_medusa_run
    from jaxeff.evals import check_metrics, evaluate_run
    from jaxeff.runs import load_model_params
    from jaxeff.train.loop import run_training

    base_cfg = tiny_config(["name=base", "train.steps=4"])
    run_training(base_cfg)
    cfg = tiny_config(["name=med", "method=medusa", "medusa.n_heads=2", "medusa.top_k=[2,2]", "train.steps=4", f"train.init_from={base_cfg.run_path}"])
    run_training(cfg)
    _, model, base, heads = load_medusa_run(cfg.run_path)
    _, plain_params = load_model_params(base_cfg.run_path)
    for k, v in _flat(plain_params).items():  # medusa1 kept the base as it was
        np.testing.assert_array_equal(_flat(base)[k], v)
    args = argparse.Namespace(
        medusa=str(cfg.run_path),
        checkpoint=None,
        prompt="12+7=",
        max_new_tokens=12,
        temperature=0.0,
        top_k=0,
        seed=0,
        step=None,
        medusa_top_k=None,
        compare=True,
    )
    assert cmd_generate_medusa(args) == 0
    text, stats = capsys.readouterr().out.strip().split("\n")[-2:]
    from jaxeff.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    ids = jnp.asarray([[tok.bos_id] + tok.encode("12+7=")], jnp.int32)
    new = [int(t) for t in np.asarray(generate(model, plain_params, ids, jax.random.key(0), max_new_tokens=12))[0]]
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert text == "12+7=" + tok.decode(new)
    assert '"acceptance_length"' in stats and '"speedup"' in stats
    opts = check_metrics(["acceptance_length"], {"examples": "3", "new_tokens": "8"})
    assert acceptance_length_metric.__name__ and opts["acceptance_length"]["new_tokens"] == 8
    result = evaluate_run(cfg.run_path, ["acceptance_length"], losses=False, examples=3, new_tokens=8)
    assert 1.0 <= result["acceptance_length"] <= 3.0 and result["medusa_tree_nodes"] == 7
    with pytest.raises(ConfigError, match="needs a method: medusa run"):
        evaluate_run(base_cfg.run_path, ["acceptance_length"], losses=False, examples=2, new_tokens=4)
    with pytest.raises(ConfigError, match="expected a method: medusa run"):
        cmd_generate_medusa(argparse.Namespace(**{**vars(args), "medusa": str(base_cfg.run_path)}))
