"""Speculative decoding: greedy output equals the target's greedy output token for token, sampled
tokens follow the target's distribution exactly (a statistical test on a tiny vocabulary), the
acceptance rule itself, statistics, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from jaxeff.decode.speculative import accept_or_resample, probs, speculative_generate
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.models.generate import generate

# init_std 0.5: peaked, input-dependent distributions (the default 0.02 gives near-uniform logits)
TARGET = TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128, init_std=0.5)
SMALL = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=128, init_std=0.5)
PROMPT = jnp.array([[3, 1, 4, 1, 5]], jnp.int32)


def _perturbed(params, scale, seed):
    """A draft that agrees with the target on some tokens and not on others."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def target():
    model = Transformer(TARGET)
    return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def greedy_reference(target):
    model, params = target
    return np.asarray(generate(model, params, PROMPT, jax.random.key(0), max_new_tokens=40))


# ------------------------------------------------------------------------------------------------
# greedy


@pytest.mark.parametrize(
    "draft_kind,gamma", [("bad", 3), ("close", 2), pytest.param("close", 1, marks=pytest.mark.slow), pytest.param("close", 5, marks=pytest.mark.slow)]
)
def test_greedy_output_equals_the_targets_greedy_output_token_for_token(target, greedy_reference, draft_kind, gamma):
    model, params = target
    if draft_kind == "bad":  # another architecture, random weights: almost nothing accepted
        draft = Transformer(SMALL)
        d_params = init_params(draft, jax.random.key(1))
    else:  # the target with noise on every weight: some drafts accepted, some rejected (caches rewound)
        draft, d_params = model, _perturbed(params, 0.5, 7)
    out, st = speculative_generate(model, params, draft, d_params, PROMPT, jax.random.key(0), max_new_tokens=40, gamma=gamma)
    np.testing.assert_array_equal(np.asarray(out), greedy_reference)
    st = {k: float(v) for k, v in st.items()}
    assert st["drafted"] == gamma * st["target_calls"] and st["generated"] >= 40
    assert st["generated"] == st["accepted"] + st["target_calls"]  # each call adds accepted + 1 tokens
    # a call ends at a rejection unless all gamma drafts were kept; alpha = accepted / (accepted + rejections)
    full = st["target_calls"] - st["rejected"]  # calls that kept all gamma drafts
    assert 0 <= full <= st["target_calls"] and full * gamma <= st["accepted"]
    assert st["alpha"] == pytest.approx(st["accepted"] / max(st["accepted"] + st["rejected"], 1))
    assert st["alpha"] >= st["acceptance_rate"] - 1e-6
    if draft_kind == "close":
        assert 0.0 < st["acceptance_rate"] < 1.0, st  # both paths (accept and reject + rewind) were taken
    else:
        assert st["acceptance_rate"] < 0.2, st


def test_a_draft_equal_to_the_target_is_always_accepted(target, greedy_reference):
    model, params = target
    out, st = speculative_generate(model, params, model, params, PROMPT, jax.random.key(0), max_new_tokens=40, gamma=4)
    np.testing.assert_array_equal(np.asarray(out), greedy_reference)
    assert float(st["acceptance_rate"]) == 1.0 and int(st["target_calls"]) == 8  # 5 tokens per call
    assert int(st["rejected"]) == 0 and float(st["alpha"]) == 1.0


@pytest.mark.slow
def test_a_draft_equal_to_the_target_is_always_accepted_when_sampling(target):
    model, params = target
    _, st = speculative_generate(model, params, model, params, PROMPT, jax.random.key(1), max_new_tokens=40, gamma=4, temperature=1.0)
    assert float(st["acceptance_rate"]) == 1.0


# ------------------------------------------------------------------------------------------------
# sampling: the output distribution is the target's


def test_acceptance_rule_gives_the_target_distribution_for_one_token():
    """Exact check of the rule on fixed p, q (no models): the chance of each token is
    q(x) min(1, p/q) + P(reject) norm(max(0, p - q))(x) = p(x), estimated from 200k draws."""
    p = jnp.array([0.5, 0.3, 0.1, 0.1, 0.0])
    q = jnp.array([0.1, 0.1, 0.2, 0.3, 0.3])
    n = 200_000

    def one(key):
        kd, ka = jax.random.split(key)
        d = jax.random.categorical(kd, jnp.log(q))[None]
        n_acc, tok = accept_or_resample(jnp.stack([p, p]), q[None], d.astype(jnp.int32), ka)
        return jnp.where(n_acc == 1, d[0], tok)

    toks = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(0), n)))
    freq = np.bincount(toks, minlength=5) / n
    assert freq[4] == 0.0  # p(x) = 0: never produced, although the draft proposes it 30% of the time
    np.testing.assert_allclose(freq, np.asarray(p), atol=0.005)  # 5 sigma of sqrt(0.25 / 200k) ~ 0.0011


def _exact_first_two(model, params, prompt, temperature, top_k):
    """A model's exact joint distribution of the first two new tokens ``[vocab, vocab]``."""
    v = model.config.vocab_size
    p1 = probs(model.apply({"params": params}, prompt).logits[0, -1], temperature=temperature, top_k=top_k)
    ext = jnp.concatenate([jnp.repeat(prompt, v, axis=0), jnp.arange(v, dtype=jnp.int32)[:, None]], axis=1)
    p2 = probs(model.apply({"params": params}, ext).logits[:, -1], temperature=temperature, top_k=top_k)
    return np.asarray(p1[:, None] * p2, np.float64)


def _chi2_pvalue(counts, expected_p, n, min_expected=5.0):
    """Pearson's chi-square goodness of fit; cells expected < 5 times are lumped into one."""
    exp = expected_p.ravel() * n
    obs = counts.ravel().astype(np.float64)
    big = exp >= min_expected
    exp_c = np.append(exp[big], exp[~big].sum())
    obs_c = np.append(obs[big], obs[~big].sum())
    if exp_c[-1] == 0:
        exp_c, obs_c = exp_c[:-1], obs_c[:-1]
    return sps.chisquare(obs_c, exp_c * obs_c.sum() / exp_c.sum()).pvalue


@pytest.mark.parametrize("gamma,temperature,top_k", [(2, 1.0, 0), pytest.param(1, 0.8, 5, marks=pytest.mark.slow)])
def test_sampled_tokens_follow_the_targets_distribution_on_a_tiny_vocabulary(gamma, temperature, top_k):
    """Vocabulary 8, a tiny random target and a smaller random draft (their joint distributions of
    two tokens are 0.5 apart in total variation; about a third of the drafts are rejected). The
    first two new tokens of n = 10,000 speculative runs (keys from seed 0) against the target's
    exact joint distribution (64 cells). Tolerance: Pearson chi-square p-value > 0.001 (cells
    expected < 5 times lumped) and total variation < 0.04 (its expected value under the null is
    about 0.02 at this n); the draft's own distribution is > 0.2 away, so the test can tell them apart."""
    t_cfg = TransformerConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, init_std=0.3)
    d_cfg = TransformerConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=32, init_std=0.3)
    target, draft = Transformer(t_cfg), Transformer(d_cfg)
    tp, dp = init_params(target, jax.random.key(0)), init_params(draft, jax.random.key(1))
    prompt = PROMPT % 8
    n = 10_000

    def run(key):
        out, st = speculative_generate(target, tp, draft, dp, prompt, key, max_new_tokens=2, gamma=gamma, temperature=temperature, top_k=top_k)
        return out[0], st["accepted"], st["drafted"]

    toks, acc, drafted = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), n))
    toks = np.asarray(toks)
    counts = np.zeros((8, 8))
    np.add.at(counts, (toks[:, 0], toks[:, 1]), 1)
    exact_t = _exact_first_two(target, tp, prompt, temperature, top_k)
    exact_d = _exact_first_two(draft, dp, prompt, temperature, top_k)
    tv = 0.5 * np.abs(counts / n - exact_t).sum()
    rate = float(np.sum(acc)) / float(np.sum(drafted))
    assert 0.2 < rate < 0.9, rate  # acceptance and rejection both happen often
    assert 0.5 * np.abs(exact_d - exact_t).sum() > 0.2
    assert tv < 0.04, tv
    assert _chi2_pvalue(counts, exact_t, n) > 1e-3


# ------------------------------------------------------------------------------------------------
# input errors


def test_vocabulary_mismatch_batch_and_gamma_are_config_errors(target):
    model, params = target
    other = Transformer(TransformerConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    o_params = init_params(other, jax.random.key(1))
    with pytest.raises(ConfigError, match="draft: vocab_size 40 differs from the target's 32"):
        speculative_generate(model, params, other, o_params, PROMPT, jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ConfigError, match="prompt: .*batch 1"):
        speculative_generate(model, params, model, params, jnp.tile(PROMPT, (2, 1)), jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ConfigError, match="gamma"):
        speculative_generate(model, params, model, params, PROMPT, jax.random.key(0), max_new_tokens=4, gamma=0)


# ------------------------------------------------------------------------------------------------
# the CLI


def _saved_run(tiny_config, name, overrides=()):
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    cfg = tiny_config([f"name={name}", *overrides])
    ckpt = Checkpointer(cfg.checkpoint_path)  # a run at its random initialisation
    ckpt.save(0, Trainer(cfg, devices=jax.devices()[:1]).init_state(), data_state={}, config=cfg.to_dict())
    ckpt.close()
    return cfg.run_path


@pytest.mark.slow
def test_speculate_cli_prints_text_and_statistics(tiny_config, capsys):
    import json

    from jaxeff.cli import main

    target = _saved_run(tiny_config, "t")
    draft = _saved_run(tiny_config, "d", ["model.n_layers=1"])
    rc = main(["speculate", "--target", str(target), "--draft", str(draft), "--prompt", "ab", "--gamma", "3", "--max-new-tokens", "8", "--compare"])
    lines = capsys.readouterr().out.strip().splitlines()
    rep = json.loads(lines[-1])
    assert rc == 0 and lines[0].startswith("ab")
    assert rep["drafted"] == 3 * rep["target_calls"] and rep["speedup"] > 0 and 0 <= rep["acceptance_rate"] <= 1
    assert rep["acceptance_rate"] <= rep["alpha"] <= 1 and 0 <= rep["rejected"] <= rep["target_calls"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--gamma", "0"], "--gamma: expected a positive number"),
        (["--temperature", "-1"], "--temperature: expected >= 0"),
        pytest.param([], "draft: vocab_size 300 differs from the target's 264", marks=pytest.mark.slow),
    ],
)
def test_speculate_cli_bad_input_exits_2_with_one_line(tiny_config, capsys, argv, msg):
    from jaxeff.cli import main

    if argv:  # checked before any run is read
        target = draft = "runs/does-not-matter"
    else:
        target = _saved_run(tiny_config, "t")
        draft = _saved_run(tiny_config, "d", ["model.vocab_size=300"])
    rc = main(["speculate", "--target", str(target), "--draft", str(draft), "--prompt", "ab", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
