"""Knowledge distillation: the losses against numpy, the teacher as a frozen sharded input, the
DistilBERT initialisation, and the sharded step."""

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import TINY
from jaxeff.config import from_dict, load_config
from jaxeff.distill import cosine_loss, distillation_loss, generalized_jsd, kd_loss, kl_divergence
from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, load_params, run_training

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# numpy references (float64)


def np_log_softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, t=1.0):
    lp, lq = np_log_softmax(p_logits, t), np_log_softmax(q_logits, t)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_jsd(p_logits, q_logits, beta, t=1.0):
    p, q = np.exp(np_log_softmax(p_logits, t)), np.exp(np_log_softmax(q_logits, t))
    m = beta * p + (1 - beta) * q
    return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


def np_masked_mean(v, mask):
    return (v * mask).sum() / mask.sum()


def _random(seed, *shape, scale=3.0):
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mask(seed, b, t):
    m = (np.random.default_rng(seed).random((b, t)) > 0.3).astype(np.float32)
    m[0, 0] = 1.0
    return m


# ------------------------------------------------------------------------------------------------
# losses


def test_kl_of_the_lecture_example_is_0_0851_nats():
    p, q = np.log([0.7, 0.2, 0.1]), np.log([0.5, 0.3, 0.2])
    assert float(kl_divergence(jnp.asarray(p), jnp.asarray(q))) == pytest.approx(0.0851, abs=5e-5)
    # kd_loss(student, teacher) at T = 1 is KL(teacher ‖ student)
    assert float(kd_loss(jnp.asarray(q)[None, None], jnp.asarray(p)[None, None])) == pytest.approx(0.0851, abs=5e-5)
    # reverse KL swaps the roles: KL(Q ‖ P) = 0.5 ln(5/7) + 0.3 ln(3/2) + 0.2 ln 2 = 0.0920
    rev = kd_loss(jnp.asarray(q)[None, None], jnp.asarray(p)[None, None], divergence="reverse_kl")
    assert float(rev) == pytest.approx(0.5 * np.log(5 / 7) + 0.3 * np.log(1.5) + 0.2 * np.log(2), abs=5e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_equals_numpy_on_random_logits(divergence, temperature):
    s, t, mask = _random(0, 3, 5, 17), _random(1, 3, 5, 17), _mask(2, 3, 5)
    if divergence == "forward_kl":
        per_tok = np_kl(t, s, temperature)
    elif divergence == "reverse_kl":
        per_tok = np_kl(s, t, temperature)
    else:
        per_tok = np_jsd(t, s, 0.3, temperature)
    want = temperature**2 * np_masked_mean(per_tok, mask)
    got = kd_loss(s, t, mask, temperature=temperature, divergence=divergence, beta=0.3)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_kl_is_zero_for_identical_logits_and_never_negative():
    z = _random(3, 4, 6, 11)
    np.testing.assert_allclose(np.asarray(kl_divergence(z, z)), 0.0, atol=1e-6)
    for seed in range(5):
        a, b = _random(10 + seed, 64, 11, scale=5.0), _random(20 + seed, 64, 11, scale=5.0)
        for d in ["forward_kl", "reverse_kl", "jsd"]:
            assert float(kd_loss(a[None], a[None], divergence=d)) == pytest.approx(0.0, abs=1e-6)
        assert np.all(np.asarray(kl_divergence(a, b)) >= 0.0)
        assert np.all(np.asarray(generalized_jsd(a, b)) >= -1e-7)
        assert np.all(np.asarray(generalized_jsd(a, b)) <= np.log(2) + 1e-6)  # JSD at β = ½ is at most ln 2


def test_t_squared_scaling_keeps_the_soft_loss_finite_at_high_temperature():
    # T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) -> (1/2V) Σ_i (δ_i − mean δ)², δ = z_t − z_s, as T -> ∞
    # (Hinton et al.: matching logits); without the T² factor it would vanish like 1/T².
    s, t = _random(4, 1, 1, 13, scale=1.0), _random(5, 1, 1, 13, scale=1.0)
    delta = (t - s)[0, 0].astype(np.float64)
    limit = 0.5 * np.mean((delta - delta.mean()) ** 2)
    for temp in [20.0, 50.0]:
        scaled = float(kd_loss(s, t, temperature=temp))
        assert scaled == pytest.approx(limit, rel=0.05)
        assert scaled == pytest.approx(temp**2 * np_kl(t, s, temp).item(), rel=1e-3)


def test_cosine_loss_equals_numpy_and_ignores_masked_tokens():
    a, b, mask = _random(6, 2, 7, 9), _random(7, 2, 7, 9), _mask(8, 2, 7)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(float(cosine_loss(a, b, mask)), np_masked_mean(1 - cos, mask), rtol=1e-5)
    assert float(cosine_loss(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-6)  # same direction, any length
    assert float(cosine_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)
    b_changed = b.copy()
    b_changed[mask == 0] = 100.0
    assert float(cosine_loss(a, b_changed, mask)) == pytest.approx(float(cosine_loss(a, b, mask)), rel=1e-6)
    with pytest.raises(ValueError, match="width"):
        cosine_loss(a, b[..., :4])


def test_distillation_loss_is_the_weighted_sum_of_ce_kd_and_cosine():
    s, t, mask = _random(9, 2, 6, 13), _random(10, 2, 6, 13), _mask(11, 2, 6)
    targets = np.random.default_rng(12).integers(0, 13, (2, 6))
    hs, ht = [_random(13, 2, 6, 5), _random(14, 2, 6, 5)], [_random(15, 2, 6, 5), _random(16, 2, 6, 5)]
    loss, parts = distillation_loss(
        s, t, targets, mask, ce_weight=0.3, kd_weight=0.6, cos_weight=0.2, student_hidden=hs, teacher_hidden=ht, temperature=2.0
    )
    ce = np_masked_mean(-np.take_along_axis(np_log_softmax(s), targets[..., None], -1)[..., 0], mask)
    kd = 4.0 * np_masked_mean(np_kl(t, s, 2.0), mask)

    def np_cos(a, b):
        c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return np_masked_mean(1 - c, mask)

    cos = (np_cos(hs[0], ht[0]) + np_cos(hs[1], ht[1])) / 2
    np.testing.assert_allclose([float(parts["ce"]), float(parts["kd"]), float(parts["cos"])], [ce, kd, cos], rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.3 * ce + 0.6 * kd + 0.2 * cos, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the method in the trainer

TEACHER_MODEL = {**TINY["model"], "n_layers": 4}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher run folder (4 layers, width 32) with one checkpoint of random parameters."""
    run = tmp_path_factory.mktemp("teacher") / "teacher"
    raw = copy.deepcopy(TINY)
    raw["model"] = dict(TEACHER_MODEL)
    cfg = from_dict(raw)
    params = init_params(Transformer(cfg.model), jax.random.PRNGKey(7), (1, 8))
    ckpt = Checkpointer(run / "checkpoints")
    ckpt.save(1, {"params": params}, data_state={}, config=cfg.to_dict())
    ckpt.close()
    return run


def _distill_cfg(tiny_config, teacher_dir, *extra):
    return tiny_config(["method=distill", f"distill.teacher_checkpoint={teacher_dir}", *extra])


def _batch(cfg):
    return build_data(cfg.data, cfg.model.vocab_size)[1].next_batch()


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_gradients_reach_the_student_and_projection_but_not_the_teacher(tiny_config, teacher_dir):
    cfg = _distill_cfg(tiny_config, teacher_dir, "model.d_model=48", "distill.cos_weight=1.0", "distill.layer_map=every_other", "mesh.data=1")
    t = Trainer(cfg, devices=jax.devices()[:1])
    state = t.init_state()
    assert set(state.params) == {"model", "proj"}
    assert state.params["proj"]["pair_0"]["kernel"].shape == (48, 32)  # student width -> teacher width
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items() if k != "domain_ids"}
    loss_fn = lambda p, f: t.method.loss(p, batch, jax.random.PRNGKey(0), frozen=f, deterministic=True)
    (_, metrics), (g_params, g_teacher) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(state.params, t.frozen)
    assert all(np.isfinite(float(metrics[k])) and float(metrics[k]) > 0 for k in ["ce", "kd", "cos"])
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
    for name in ["model", "proj"]:
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_params[name])) > 0, name
    # the optimizer keeps state for the trained tree only (AdamW mu/nu), none for the teacher
    n_trained = sum(x.size for x in jax.tree.leaves(state.params))
    n_teacher = sum(x.size for x in jax.tree.leaves(t.frozen))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_teacher > 0 and 2 * n_trained <= n_opt < 2 * n_trained + n_teacher


def test_every_other_layer_init_copies_teacher_layers_0_2_and_the_embeddings(tiny_config, teacher_dir):
    cfg = _distill_cfg(tiny_config, teacher_dir, "distill.student_init=every_other_layer", "mesh.data=1")
    t = Trainer(cfg, devices=jax.devices()[:1])
    student = _host(t.init_state().params["model"])
    teacher = _host(t.frozen)
    assert sorted(k for k in student if k.startswith("layers_")) == ["layers_0", "layers_1"]
    for i, j in [(0, 0), (1, 2)]:
        for a, b in zip(jax.tree.leaves(student[f"layers_{i}"]), jax.tree.leaves(teacher[f"layers_{j}"])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(student["layers_1"]["attn"]["q"]["kernel"], teacher["layers_1"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(student["embed"]["embedding"], teacher["embed"]["embedding"])
    np.testing.assert_array_equal(student["final_norm"]["scale"], teacher["final_norm"]["scale"])


def test_every_other_layer_init_refuses_a_different_width_by_name(tiny_config, teacher_dir):
    cfg = _distill_cfg(tiny_config, teacher_dir, "distill.student_init=every_other_layer", "model.d_model=48")
    with pytest.raises(ConfigError, match=r"distill.student_init: .*model.d_model is 48 here and 32 in the teacher"):
        Trainer(cfg, devices=jax.devices()[:1])


def test_bad_teacher_inputs_are_one_line_errors_naming_the_key(tiny_config, teacher_dir, tmp_path):
    cases = [
        (["distill.teacher_checkpoint=null"], ConfigError, "distill.teacher_checkpoint: expected the teacher's run"),
        ([f"distill.teacher_checkpoint={tmp_path / 'nope'}"], CheckpointError, "distill.teacher_checkpoint: .*does not exist"),
        ([f"distill.teacher_checkpoint={teacher_dir}", "model.vocab_size=300"], ConfigError, "teacher's vocab_size is 264 but model.vocab_size is 300"),
        (
            [f"distill.teacher_checkpoint={teacher_dir}", "distill.layer_map=every_other", "distill.cos_weight=1", "model.n_layers=3"],
            ConfigError,
            "needs a teacher of >= 6 layers",
        ),
    ]
    for overrides, error, pattern in cases:
        cfg = tiny_config(["method=distill", *overrides])
        with pytest.raises(error, match=pattern) as info:
            Trainer(cfg, devices=jax.devices()[:1])
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="distill: ce_weight, kd_weight and cos_weight are all 0"):
        tiny_config(["distill.ce_weight=0", "distill.kd_weight=0"])


# float32 reductions in a different order across shards; Adam's first step ~ lr·sign(g) (see test_train.py)
def test_sharded_distill_step_on_8_devices_equals_the_single_device_step(tiny_config, teacher_dir):
    assert jax.device_count() == 8
    common = ["optim.name=adamw", "model.d_model=48", "distill.cos_weight=0.5", "distill.layer_map=every_other", "distill.divergence=jsd"]
    cfg1 = _distill_cfg(tiny_config, teacher_dir, "mesh.data=1", *common)
    cfg8 = _distill_cfg(tiny_config, teacher_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *common)
    batch = _batch(cfg1)
    t1, t8 = Trainer(cfg1, devices=jax.devices()[:1]), Trainer(cfg8)
    # the teacher is sharded like a model: q kernel [embed, heads] over fsdp x tensor
    assert t8.frozen["layers_0"]["attn"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert t8.param_shardings["model"]["layers_0"]["attn"]["q"]["kernel"].spec == P("fsdp", "tensor")
    s1, m1 = t1.train_step(t1.init_state(), batch)
    s8, m8 = t8.train_step(t8.init_state(), batch)
    for k in ["loss", "ce", "kd", "cos"]:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(_host(s1.params)), jax.tree.leaves(_host(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=5e-5)


def test_distill_run_logs_its_loss_terms_and_evaluates_the_student(tiny_config, teacher_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _distill_cfg(
        tiny_config, teacher_dir, "distill.teacher_dtype=bfloat16", "train.steps=2", "mesh.data=1", "train.eval_every=2", "train.log_every=1"
    )
    out = run_training(cfg, devices=jax.devices()[:1])
    acc = EventAccumulator(str(cfg.run_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ["train/ce", "train/kd", "train/loss", "eval/loss", "eval/loss/prose"]:
        assert tag in tags, tag
    assert np.isfinite(out["eval/loss"]) and out["train/kd"] > 0
    # the checkpoint holds the trained tree (the student) and no teacher arrays
    _, params = load_params(cfg, cfg.checkpoint_path, devices=jax.devices()[:1])
    assert set(params) == {"model"}
    assert sorted(k for k in params["model"] if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_every_distill_yaml_config_loads():
    paths = sorted((REPO / "configs" / "distill").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(path)
        if cfg.method == "distill":
            assert cfg.distill.teacher_checkpoint
            assert cfg.model.n_layers < TransformerConfig(**load_config(REPO / "configs/distill/teacher.yaml").to_dict()["model"]).n_layers


# ------------------------------------------------------------------------------------------------
# offline top-k


def test_topk_kd_loss_is_the_kl_to_the_renormalised_teacher_top_k():
    from jaxeff.distill.offline import topk_kd_loss

    s, t, mask = _random(20, 2, 5, 19), _random(21, 2, 5, 19), _mask(22, 2, 5)
    for k in [19, 4]:
        vals, ids = jax.lax.top_k(jnp.asarray(t), k)
        got = topk_kd_loss(s, vals, ids, mask, temperature=2.0)
        trunc = np.full_like(t, -np.inf)
        np.put_along_axis(trunc, np.asarray(ids), np.asarray(vals), -1)
        p = np.exp(np_log_softmax(trunc, 2.0))
        ls = np_log_softmax(s, 2.0)
        kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - ls), 0).sum(-1)
        np.testing.assert_allclose(float(got), 4.0 * np_masked_mean(kl, mask), rtol=1e-5)
        if k == 19:  # the whole vocabulary: the online loss exactly
            np.testing.assert_allclose(float(got), float(kd_loss(s, t, mask, temperature=2.0)), rtol=1e-5)


def test_offline_rows_are_found_by_fingerprint_and_unknown_rows_are_not():
    from jaxeff.distill.offline import lookup, row_fingerprints

    rng = np.random.default_rng(23)
    inputs = rng.integers(0, 264, (50, 16)).astype(np.int32)
    segs = np.ones_like(inputs)
    fp = row_fingerprints(inputs, segs)
    order = np.argsort(fp[:, 0])
    query = inputs[[7, 3, 41]].copy()
    query[2, 5] += 1  # one token changed: not in the table
    idx, found = lookup(jnp.asarray(fp[order]), jnp.asarray(query), jnp.asarray(segs[:3]))
    assert list(np.asarray(found)) == [True, True, False]
    assert list(order[np.asarray(idx)[:2]]) == [7, 3]
    np.testing.assert_array_equal(np.asarray(row_fingerprints(jnp.asarray(inputs), jnp.asarray(segs))), fp)


@pytest.mark.slow
def test_offline_top_k_over_the_whole_vocabulary_reproduces_the_online_step(tiny_config, teacher_dir, tmp_path):
    from jaxeff.distill.offline import precompute_topk

    online = _distill_cfg(tiny_config, teacher_dir, "mesh.data=1", "distill.temperature=2.0")
    path = precompute_topk(online, 264, tmp_path / "top.npz")
    offline = _distill_cfg(tiny_config, teacher_dir, "mesh.data=1", "distill.temperature=2.0", f"distill.offline_topk={path}")
    batch = _batch(online)
    t_on, t_off = Trainer(online, devices=jax.devices()[:1]), Trainer(offline, devices=jax.devices()[:1])
    _, m_on = t_on.train_step(t_on.init_state(), batch)
    _, m_off = t_off.train_step(t_off.init_state(), batch)
    assert float(m_off["offline_miss"]) == 0.0  # every batch row was found by its fingerprint
    for key in ["loss", "ce", "kd"]:
        np.testing.assert_allclose(float(m_off[key]), float(m_on[key]), rtol=2e-5)
    with pytest.raises(ConfigError, match="offline top-k supports forward_kl only"):
        Trainer(_distill_cfg(tiny_config, teacher_dir, f"distill.offline_topk={path}", "distill.divergence=jsd"))


def test_a_trainer_built_to_load_a_distilled_run_reads_no_teacher(tiny_config, tmp_path):
    """eval / generate / jaxeff.runs read a student as the student alone: the teacher folder may be gone."""
    cfg = _distill_cfg(tiny_config, tmp_path / "gone", "model.d_model=48", "distill.cos_weight=1.0", "mesh.data=1")
    t = Trainer(cfg, devices=jax.devices()[:1], purpose="load")
    assert t.frozen is None and set(t.abstract_state.params) == {"model"}
    assert t.n_params == cfg.model.param_count()
    with pytest.raises(CheckpointError, match=r"^distill.teacher_checkpoint: .*does not exist"):
        Trainer(cfg, devices=jax.devices()[:1])
