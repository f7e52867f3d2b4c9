"""Lottery tickets (method ``lottery``): iterative magnitude pruning with rewinding, all rounds in one run."""

import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeff.prune.lottery as L
from jaxeff.errors import ConfigError
from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings

# 2 rounds of 4 steps after a dense phase of 4: transitions at steps 4 and 8
LOTTERY = ["method=lottery", "lottery.rounds=2", "lottery.prune_fraction=0.5", "train.steps=12", "mesh.data=1", "train.eval_every=4", "train.log_every=2"]


def _leaves(masks):
    return [np.asarray(m) for m in jax.tree.leaves(masks)]


def _kernels(model, masks):
    """The model's kernels at the mask tree's paths, in the same order as ``_leaves(masks)``."""
    return [np.asarray(L._get(model, keys)) for keys, _ in L._flat(masks)]


def _random_tree(cfg, seed=0):
    from jaxeff.models import Transformer, init_params

    return init_params(Transformer(cfg.model), jax.random.PRNGKey(seed), (1, 8))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_share_after_r_rounds_is_one_minus_keep_to_the_r(tiny_config, scope):
    cfg = tiny_config(["mesh.data=1"])
    params = _random_tree(cfg)
    paths = L.prunable_paths(params)
    assert len(paths) == 7 * cfg.model.n_layers  # q k v o gate up down of every block; no embedding
    masks = L.dense_masks(params, paths)
    p = 0.3
    prune = jax.jit(L.magnitude_masks, static_argnames="scope")
    for r in range(1, 5):
        masks = prune(params, masks, L.keep_counts(masks, (1 - p) ** r, scope), scope=scope)
        kept, total = (int(x) for x in L.count(masks))
        # exact up to rounding: one weight per kernel (layer) or one in all (global)
        slack = (len(paths) if scope == "layer" else 1) / total
        assert abs((1 - kept / total) - L.sparsity_after(r, p)) <= slack
        if scope == "layer":  # every kernel alone has the share too
            for m in _leaves(masks):
                assert abs(m.mean() - (1 - p) ** r) <= 1 / m.size
    # survivors are the largest magnitudes: the smallest kept |w| is >= the largest pruned |w| (global)
    if scope == "global":
        w = np.concatenate([np.abs(k).ravel() for k in _kernels(params, masks)])
        m = np.concatenate([x.ravel() for x in _leaves(masks)])
        assert w[m == 1].min() >= w[m == 0].max()


def test_pruned_weights_stay_pruned_when_magnitudes_change_and_masks_are_nested(tiny_config):
    cfg = tiny_config(["mesh.data=1"])
    params = _random_tree(cfg)
    paths = L.prunable_paths(params)
    m1 = L.magnitude_masks(params, L.dense_masks(params, paths), L.keep_counts(L.dense_masks(params, paths), 0.5, "layer"), "layer")
    big = jax.tree.map(lambda x: x * 0 + 100.0, params)  # every weight now larger than any survivor was
    m2 = L.magnitude_masks(big, m1, L.keep_counts(m1, 0.25, "layer"), "layer")
    for a, b in zip(_leaves(m1), _leaves(m2)):
        assert np.all(b <= a)  # nothing pruned in round 1 comes back in round 2
        assert b.sum() == round(a.size * 0.25)


def _fake_loop(trainer, state, step):
    logged = {}
    return types.SimpleNamespace(
        cfg=trainer.cfg,
        trainer=trainer,
        state=state,
        step=step,
        last={},
        logged=logged,
        ckpt=types.SimpleNamespace(latest_step=lambda: None),
        logger=types.SimpleNamespace(scalars=lambda s, v: logged.update(v), message=lambda text: None),
        evaluate=lambda: {"eval/loss": 1.0},
        reset_clock=lambda: None,
    )


def _steps(trainer, loader, loop, n):
    """Train ``n`` steps; the learning rate of each (the ``lottery/lr`` metric)."""
    lrs = []
    for _ in range(n):
        loop.state, m = trainer.train_step(loop.state, loader.next_batch())
        loop.step += 1
        lrs.append(float(m["lottery/lr"]))
    return lrs


def _round_hooks(trainer):
    hooks = {h.name: h for h in trainer.method.hooks}
    return hooks.get("lottery_rewind"), hooks["lottery_round"]


@pytest.mark.parametrize("rewind_step", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_survivors_are_rewound_to_their_rewind_step_values_and_pruned_weights_stay_exactly_zero(tiny_config, rewind_step):
    from jaxeff.train.inputs import build_data
    from jaxeff.train.runtime import Trainer

    # adamw with weight decay and a high learning rate: anything that could revive a pruned weight would
    cfg = tiny_config([*LOTTERY, f"lottery.rewind_step={rewind_step}", "optim.weight_decay=0.5", "optim.lr=3e-2"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    loop = _fake_loop(trainer, trainer.init_state(), 0)
    init = jax.device_get(loop.state.params["model"])
    rewind_hook, round_hook = _round_hooks(trainer)
    assert (rewind_hook is None) == (rewind_step == 0)
    lrs = []
    if rewind_step:
        lrs += _steps(trainer, loader, loop, rewind_step)
        rewind_hook.fn(loop)
    at_rewind = jax.device_get(loop.state.params["model"])
    assert rewind_step or all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at_rewind), jax.tree.leaves(init)))
    lrs += _steps(trainer, loader, loop, 4 - rewind_step)
    trained = jax.device_get(loop.state.params["model"])
    round_hook.fn(loop)  # end of the dense phase: prune half, rewind
    p = jax.device_get(loop.state.params)
    assert loop.logged["lottery/sparsity"] == pytest.approx(0.5, abs=1e-3)
    for keys, m in L._flat(p["mask"]):
        kept = m != 0
        assert np.array_equal(L._get(p["model"], keys)[kept], L._get(at_rewind, keys)[kept])  # rewound, bit for bit
        assert np.all(L._get(p["model"], keys)[~kept] == 0)
        # the survivors are the larger half of the *trained* magnitudes
        w = np.abs(L._get(trained, keys))
        assert w[kept].min() >= w[~kept].max()
    for a, b in zip(jax.tree.leaves(p["rewind"]), jax.tree.leaves(at_rewind)):
        assert np.array_equal(a, b)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p["model"]["embed"]), jax.tree.leaves(at_rewind["embed"])))  # rewound, not pruned
    # the optimizer state restarted: adam's step count is 0 again
    counts = [int(x) for x in jax.tree.leaves(loop.state.opt_state) if np.ndim(x) == 0 and "int" in str(x.dtype)]
    assert counts and set(counts) == {0}
    mask_before = jax.device_get(loop.state.params["mask"])
    assert _steps(trainer, loader, loop, 4) == lrs  # a whole round with the mask; the schedule restarted
    q = jax.device_get(loop.state.params)
    for keys, m in L._flat(q["mask"]):
        assert np.array_equal(m, L._get(mask_before, keys))  # masks fixed during a round
        w = L._get(q["model"], keys)
        assert np.all(w[m == 0] == 0) and np.count_nonzero(w[m != 0]) == np.count_nonzero(m)
    assert not np.array_equal(L._get(q["model"], L._flat(q["mask"])[0][0]), L._get(p["model"], L._flat(q["mask"])[0][0]))


@pytest.mark.slow
def test_random_reinit_with_masks_from_a_lottery_run_puts_its_masks_on_fresh_random_weights(tiny_config, tmp_path):
    from jaxeff.train.inputs import build_data
    from jaxeff.train.runtime import Trainer

    src = tiny_config([*LOTTERY, "name=src"])
    params = _random_tree(src, seed=5)
    paths = L.prunable_paths(params)
    masks = L.magnitude_masks(params, L.dense_masks(params, paths), L.keep_counts(L.dense_masks(params, paths), 0.5, "global"), "global")
    L.save_masks(L.masks_file(src.run_path, 1), masks)
    with pytest.raises(ConfigError, match=r"lottery.masks_from: .* no masks for round\(s\) \[2\]"):
        Trainer(tiny_config([*LOTTERY, "name=ctl", f"lottery.masks_from={src.run_path}"]), devices=jax.devices()[:1])
    L.save_masks(L.masks_file(src.run_path, 2), masks)
    cfg = tiny_config([*LOTTERY, "name=ctl", "lottery.reinit=random", f"lottery.masks_from={src.run_path}"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    loop = _fake_loop(trainer, trainer.init_state(), 0)
    assert "rewind" not in loop.state.params  # nothing to rewind to
    init = jax.device_get(loop.state.params["model"])
    _steps(trainer, loader, loop, 4)
    _round_hooks(trainer)[1].fn(loop)
    p = jax.device_get(loop.state.params)
    for a, b in zip(_leaves(p["mask"]), _leaves(masks)):
        assert np.array_equal(a, b)  # the given masks, not this run's magnitudes
    for keys, m in L._flat(p["mask"]):
        w, w0 = L._get(p["model"], keys), L._get(init, keys)
        assert np.all(w[m == 0] == 0)
        assert not np.allclose(w[m != 0], w0[m != 0])  # fresh weights, not the initialisation
        assert abs(w[m != 0].std() - w0.std()) < 0.3 * w0.std()  # but drawn like it


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.steps=10"], r"lottery.rounds: train.steps=10 does not split into rounds \+ 1 = 3 equal phases"),
        (["lottery.steps_per_round=5"], r"lottery.steps_per_round: train.steps=12 must equal .* = 3 \* 5 = 15"),
        (["lottery.rewind_step=4"], r"lottery.rewind_step: 4 must be below steps_per_round=4"),
        (["lottery.targets=nothing_matches"], r"lottery.targets: no Dense layer matches"),
        (["lottery.targets=(("], r"lottery.targets: '\(\(' is not a valid regex"),
        (["lottery.masks_from=/nonexistent"], r"lottery.masks_from: '/nonexistent' has no masks for round\(s\) \[1, 2\]"),
    ],
)
def test_bad_lottery_settings_are_one_line_config_errors(tiny_config, overrides, match):
    from jaxeff.train.runtime import Trainer

    with pytest.raises(ConfigError, match=match) as e:
        Trainer(tiny_config([*LOTTERY, *overrides]), devices=jax.devices()[:1])
    assert "\n" not in str(e.value)


def test_prune_fraction_and_rounds_are_validated_by_the_schema(tiny_config):
    with pytest.raises(ConfigError, match=r"lottery.prune_fraction: .*less than 1"):
        tiny_config([*LOTTERY, "lottery.prune_fraction=1.0"])
    with pytest.raises(ConfigError, match=r"lottery.scope: "):
        tiny_config([*LOTTERY, "lottery.scope=row"])


def _final_params(cfg, devices=None):
    from jaxeff.train.runtime import Trainer

    trainer = Trainer(cfg, devices=devices)
    with Checkpointer(cfg.checkpoint_path, create=False) as ckpt:
        return jax.device_get(ckpt.restore_params(abstract_with_shardings(trainer.abstract_state.params, trainer.param_shardings)))


# mid-round: checkpoints at 3, 6, 9 (transitions at 4, 8), resumed from 6; at a boundary: checkpoints at 4 and 8,
# written by the loop before the round hook ran (so rewritten by it), resumed from 4 -- on 8 devices (data x fsdp x
# tensor = 2 x 2 x 2: sharded masks)
@pytest.mark.parametrize(
    "every, cut, mesh",
    [(3, 6, ["mesh.data=1"]), pytest.param(4, 4, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], marks=pytest.mark.slow)],
    ids=["mid-round", "at-a-round-boundary-8-devices"],
)
def test_a_run_resumed_from_a_checkpoint_ends_with_the_masks_and_losses_of_an_uninterrupted_one(tiny_config, every, cut, mesh):
    from jaxeff.train.loop import run_training

    devices = jax.devices()[:1] if mesh == ["mesh.data=1"] else None
    common = [*LOTTERY, f"checkpoint.every={every}", "lottery.rewind_step=1", "lottery.scope=global", *mesh]
    straight = tiny_config([*common, "name=straight"])
    a = run_training(straight, devices=devices)
    assert a["step"] == 12 and a["lottery/sparsity"] == pytest.approx(0.75, abs=1e-3)
    record = L.read_record(straight.run_path)["rounds"]
    assert [r["round"] for r in record] == [0, 1, 2]
    assert [round(r["sparsity"], 3) for r in record] == [0.0, 0.5, 0.75]
    split = tiny_config([*common, "name=split", "resume=true"])
    shutil.copytree(straight.run_path / "checkpoints", split.run_path / "checkpoints")
    for step in Checkpointer(split.checkpoint_path, create=False).all_steps():
        if step > cut:
            shutil.rmtree(split.checkpoint_path / str(step))
    b = run_training(split, devices=devices)
    pa, pb = _final_params(straight, devices), _final_params(split, devices)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.array_equal(x, y)
    keys = [k for k in a if k.startswith(("train/", "eval/loss", "lottery/")) and not k.startswith(("train/step_time", "perf/"))]
    assert len(keys) > 5 and {k: a[k] for k in keys} == {k: b[k] for k in keys}
    # the final masks are the ones the run saved for its last round, and the stored pruned weights are 0
    saved = L.load_masks(L.masks_file(straight.run_path, 2), pa["mask"])
    for keys_, m in L._flat(pa["mask"]):
        assert np.array_equal(m, L._get(saved, keys_))
        assert np.all(L._get(pa["model"], keys_)[m == 0] == 0)


@pytest.mark.slow
def test_eval_of_a_lottery_run_uses_the_masked_weights(tiny_config):
    from jaxeff.runs import load_model_params
    from jaxeff.train.loop import run_training

    cfg = tiny_config([*LOTTERY, "checkpoint.every=12"])
    run_training(cfg, devices=jax.devices()[:1])
    _, params = load_model_params(cfg.run_path)
    masks = _final_params(cfg, jax.devices()[:1])["mask"]
    for keys, m in L._flat(masks):
        assert np.all(np.asarray(L._get(params, keys))[np.asarray(m) == 0] == 0)


def test_shipped_config_trains_the_quickstart_model_in_four_rounds():
    from jaxeff.config import load_config

    cfg = load_config("configs/prune/lottery.yaml")
    assert cfg.method == "lottery" and cfg.train.steps == (cfg.lottery.rounds + 1) * L.round_plan(cfg)


def test_global_masks_are_one_threshold_over_all_kernels():
    params = {"a": {"kernel": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}, "b": {"kernel": jnp.asarray([[0.5, 0.6]])}}
    masks = L.dense_masks(params, ["a", "b"])
    g = L.magnitude_masks(params, masks, L.keep_counts(masks, 0.5, "global"), "global")
    assert [x.tolist() for x in _leaves(g)] == [[[0, 1], [1, 1]], [[0, 0]]]  # b loses both: all below a's
    per = L.magnitude_masks(params, masks, L.keep_counts(masks, 0.5, "layer"), "layer")
    assert [x.tolist() for x in _leaves(per)] == [[[0, 0], [1, 1]], [[0, 1]]]


def test_a_state_that_skipped_a_round_transition_is_refused_at_the_next_boundary(tiny_config):
    from jaxeff.errors import JaxeffError
    from jaxeff.train.runtime import Trainer

    cfg = tiny_config(LOTTERY)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    loop = _fake_loop(trainer, trainer.init_state(), 8)  # still dense at the end of phase 1 (should keep half)
    with pytest.raises(
        JaxeffError,
        match=r"lottery: at step 8 the state keeps 18,432 prunable weights, but phase 1 "
        r"keeps 9,216: a round transition was skipped",
    ):
        _round_hooks(trainer)[1].fn(loop)
