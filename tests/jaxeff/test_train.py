import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, run_training
from jaxeff.train.methods import lm_method, register_method


def _batch(cfg):
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    return loader.next_batch()


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# Tolerances: SGD moves parameters by lr·grad, so float32 reduction-order noise stays ~1e-7. Adam's
# first step is ~lr·sign(grad): a gradient within noise of zero may move differently, so parameters
# agree to 5e-5 absolute (lr = 3e-3) rather than to float32 precision.
@pytest.mark.parametrize("optim,atol", [("sgd", 2e-6), ("adamw", 5e-5)])
def test_sharded_step_on_8_devices_equals_the_single_device_step(tiny_config, optim, atol):
    assert jax.device_count() == 8
    cfg1 = tiny_config(["mesh.data=1", f"optim.name={optim}", "model.d_model=64", "model.d_ff=128"])
    cfg8 = tiny_config(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"optim.name={optim}", "model.d_model=64", "model.d_ff=128"])
    batch = _batch(cfg1)
    t1 = Trainer(cfg1, devices=jax.devices()[:1])
    t8 = Trainer(cfg8)
    assert dict(t8.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # parameters really are split: the q kernel [embed, heads] over fsdp x tensor
    q_sharding = t8.param_shardings["layers_0"]["attn"]["q"]["kernel"]
    assert q_sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    s1, m1 = t1.train_step(t1.init_state(), batch)
    s8, m8 = t8.train_step(t8.init_state(), batch)
    # tolerance: float32 reductions in a different order across shards
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_host(s1.params)), jax.tree.leaves(_host(s8.params))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol)


def test_gradient_accumulation_equals_one_full_batch_step(tiny_config):
    # equal token counts per micro-batch make the mean of means the full-batch mean
    cfg = tiny_config(["optim.name=sgd", "mesh.data=1"])
    batch = _batch(cfg)
    batch["loss_mask"] = np.ones_like(batch["loss_mask"])
    full = Trainer(cfg, devices=jax.devices()[:1])
    acc = Trainer(tiny_config(["optim.name=sgd", "mesh.data=1", "optim.grad_accum=4"]), devices=jax.devices()[:1])
    s_full, m_full = full.train_step(full.init_state(), batch)
    s_acc, m_acc = acc.train_step(acc.init_state(), batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_host(s_full.params)), jax.tree.leaves(_host(s_acc.params))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@register_method("_test_frozen_embed")
def _frozen_embed_method(cfg, model):
    base = lm_method(cfg, model)
    return dataclasses.replace(base, name="_test_frozen_embed", trainable=lambda p: {k: jax.tree.map(lambda _: k != "embed", v) for k, v in p.items()})


def test_frozen_parameters_get_no_optimizer_state_and_never_change(tiny_config):

    cfg = tiny_config(["mesh.data=1", "method=_test_frozen_embed"])  # the schema accepts registered methods
    t = Trainer(cfg, devices=jax.devices()[:1])
    state = t.init_state()
    before = _host(state.params)
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_trainable = t.n_trainable
    assert t.n_params - n_trainable == before["embed"]["embedding"].size
    assert n_state < 2 * t.n_params  # adam's mu/nu only for trainable params (+ counters)
    assert n_state >= 2 * n_trainable
    state, _ = t.train_step(state, _batch(cfg))
    after = _host(state.params)
    np.testing.assert_array_equal(after["embed"]["embedding"], before["embed"]["embedding"])
    assert not np.array_equal(after["layers_0"]["attn"]["q"]["kernel"], before["layers_0"]["attn"]["q"]["kernel"])


@register_method("_test_hooks")
def _hooks_method(cfg, model):
    import optax

    base = lm_method(cfg, model)

    def loss(params, batch, rng, *, frozen, deterministic, step):
        value, metrics = base.loss(params, batch, rng, frozen=frozen, deterministic=deterministic)
        return value, {**metrics, "seen_step": step.astype(jnp.float32)}

    def optimizer(optim_cfg, total_steps, trainable):  # gradient ascent on every parameter
        return optax.sgd(-0.1)

    return dataclasses.replace(base, name="_test_hooks", loss=loss, with_step=True, optimizer=optimizer)


def test_method_hooks_pass_the_step_to_the_loss_and_replace_the_optimizer(tiny_config):
    cfg = tiny_config(["mesh.data=1", "method=_test_hooks"])
    t = Trainer(cfg, devices=jax.devices()[:1])
    state = t.init_state()
    batch = _batch(cfg)
    state, m0 = t.train_step(state, batch)
    state, m1 = t.train_step(state, batch)
    state, m2 = t.train_step(state, batch)
    assert [float(m["seen_step"]) for m in (m0, m1, m2)] == [0.0, 1.0, 2.0]
    assert float(m2["loss"]) > float(m1["loss"]) > float(m0["loss"])  # ascent: the loss rises


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(tiny_config, tmp_path):
    straight = tiny_config(["name=straight", "train.log_every=1"])
    run_training(straight)
    first_half = tiny_config(["name=resumed", "train.log_every=1", "train.steps=6"])
    # stop after 3 steps (the checkpoint interval), then resume to 6 with the same command + resume
    cut = tiny_config(["name=resumed", "train.log_every=1", "train.steps=3"])
    run_training(cut)
    out = run_training(
        dataclasses.replace(first_half, resume=True) if False else type(first_half).model_validate({**first_half.to_dict(), "resume": True})
    )
    assert out["step"] == 6
    a = _scalars(straight.run_path)["train/loss"]
    b = _scalars(first_half.run_path)["train/loss"]
    assert [s for s, _ in a] == list(range(1, 7)) and [s for s, _ in b] == list(range(1, 7))
    # on CPU the losses after resume are bit-for-bit those of the uninterrupted run
    assert [v for _, v in a] == [v for _, v in b]
    assert Checkpointer(straight.checkpoint_path, create=False).all_steps() == [3, 6]


def test_run_writes_tensorboard_scalars_config_and_a_checkpoint(tiny_config):
    cfg = tiny_config(["train.peak_flops=1e11"])
    out = run_training(cfg)
    tags = _scalars(cfg.run_path)
    for tag in [
        "train/loss",
        "train/perplexity",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_sec",
        "perf/step_time_s",
        "perf/mfu",
        "eval/loss",
        "eval/loss/arithmetic",
        "eval/loss/prose",
    ]:
        assert tag in tags, tag
        assert all(np.isfinite(v) for _, v in tags[tag])
    assert (cfg.run_path / "config.yaml").read_text().startswith("name: tiny")
    assert Checkpointer(cfg.checkpoint_path, create=False).latest_step() == 6
    assert np.isfinite(out["eval/loss"])


def test_eval_loss_falls_during_training(tiny_config):
    cfg = tiny_config(["train.steps=40", "train.eval_every=20", "optim.lr=1e-2", "optim.warmup_steps=5"])
    run_training(cfg)
    ev = _scalars(cfg.run_path)["eval/loss"]
    assert ev[0][0] == 0 and ev[-1][0] == 40
    assert ev[-1][1] < ev[0][1] - 1.0, ev


def test_a_checkpoint_of_a_different_model_is_refused_by_name(tiny_config):
    from jaxeff.errors import CheckpointError

    cfg = tiny_config(["train.steps=3"])
    run_training(cfg)
    other = tiny_config(["train.steps=6", "model.d_model=48", "resume=true"])
    with pytest.raises(CheckpointError, match=r"model\.d_model is 32 there but 48 here"):
        run_training(other)


def test_trains_on_local_jsonl_files_through_datasets(tiny_config, tmp_path):
    import json as _json

    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(_json.dumps({"body": f"document {i}: " + "abc " * (i % 7 + 3)}) for i in range(60)))
    cfg = tiny_config(["data.source=files", f"data.paths=[{path}]", "data.text_field=body", "train.steps=3", "data.eval_fraction=0.2"])
    out = run_training(cfg)
    assert out["step"] == 3
    assert np.isfinite(out["eval/loss/files"])


def test_restoring_params_missing_from_a_checkpoint_is_refused_by_name(tmp_path):
    from jaxeff.errors import CheckpointError

    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, {"params": {"model": {"w": jnp.ones((2, 3))}}}, data_state={}, config={})
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "ckpt", create=False)  # as train.init_from opens another run's checkpoint
    abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    with pytest.raises(CheckpointError, match=r"has no parameter 'w'"):
        ckpt.restore_params(abstract)
    ckpt.close()


def test_a_train_state_saved_with_the_old_extra_field_still_restores(tiny_config, tmp_path):
    """Checkpoints written before TrainState.extra was dropped (it was always {}) resume."""
    from jaxeff.train.checkpoint import _StateWithExtra

    cfg = tiny_config(["mesh.data=1"])
    t = Trainer(cfg, devices=jax.devices()[:1])
    state = t.init_state()
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, _StateWithExtra(**fields, extra={}), data_state={"pos": 1}, config=cfg.to_dict())
        restored, data = ckpt.restore(t.abstract_state, 3)
    assert type(restored) is type(state) and data == {"pos": 1}
    for a, b in zip(jax.tree.leaves(_host(restored)), jax.tree.leaves(_host(state))):
        np.testing.assert_array_equal(a, b)


def test_a_hook_of_the_method_runs_in_the_loop_and_may_replace_the_state(tiny_config):
    from jaxeff.train.loop import Hook

    seen = []

    def halve(loop):  # e.g. a pruning round: rewrite the parameters between steps
        seen.append(loop.step)
        loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 0, loop.state.params))

    @register_method("_test_method_hook")
    def _m(cfg, model):
        return dataclasses.replace(lm_method(cfg, model), name="_test_method_hook", hooks=(Hook("zero", 2, halve, at_end=False),))

    cfg = tiny_config(["method=_test_method_hook", "train.steps=3", "train.eval_every=3", "checkpoint.every=3"])
    run_training(cfg, devices=jax.devices()[:1])
    assert seen == [2]
    with Checkpointer(cfg.checkpoint_path) as ckpt:
        params = ckpt.restore_params(Trainer(cfg, devices=jax.devices()[:1]).abstract_state.params)
    # zeroed at step 2, then one more update: the weights are one Adam step from zero, not the init's scale
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(_host(params))) < 0.01


@register_method("_test_wrapped")
def _wrapped_method(cfg, model):
    base = lm_method(cfg, model)

    def loss(params, batch, rng, *, frozen, deterministic):
        return base.loss(params["model"], batch, rng, frozen=frozen, deterministic=deterministic)

    return dataclasses.replace(
        base,
        name="_test_wrapped",
        loss=loss,
        prepare_params=lambda p, rng: {"model": p},
        logical_axes=lambda a: {"model": a},
        model_params=lambda p: p["model"],
    )


@pytest.mark.parametrize("legacy_key", ["base", "student"])
def test_a_prepared_tree_saved_under_its_old_model_key_still_restores(tiny_config, tmp_path, legacy_key):
    """lora/qlora runs wrote the model under "base", distill runs under "student" (before 2026-12)."""
    from jaxeff.train.checkpoint import _renamed, _StateWithExtra

    cfg = tiny_config(["mesh.data=1", "method=_test_wrapped"])
    t = Trainer(cfg, devices=jax.devices()[:1])
    state = t.init_state()
    state, _ = t.train_step(state, _batch(cfg))  # an optimizer state that is not all zeros
    fields = _renamed({f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, "model", legacy_key)
    assert legacy_key in fields["params"]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, _StateWithExtra(**fields, extra={}), data_state={}, config=cfg.to_dict())
    with Checkpointer(tmp_path / "ckpt", create=False) as ckpt:
        restored, _ = ckpt.restore(t.abstract_state, 1)
    with Checkpointer(tmp_path / "ckpt", create=False) as ckpt:  # (orbax: one handler per item and manager)
        params = ckpt.restore_params(t.abstract_state.params, 1)
    assert list(restored.params) == ["model"] and list(params) == ["model"]
    for a, b in zip(jax.tree.leaves(_host(restored)), jax.tree.leaves(_host(state))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(_host(params)), jax.tree.leaves(_host(state.params))):
        np.testing.assert_array_equal(a, b)
