"""Dynamic batch loading (Sheared-LLaMA, ``data.dynamic``): the weight update on worked examples, the
sampler under changing weights, the trainer's updates, their logs and their checkpointing."""

import json
import math

import jax
import numpy as np
import pytest

from jaxeff.data.dynamic import deltas, update_weights
from jaxeff.data.loader import MixtureLoader
from jaxeff.data.packing import PACKED_KEYS
from jaxeff.errors import ConfigError
from jaxeff.train.loop import run_training

E = math.e


# ------------------------------------------------------------------------------ the update, by hand
def test_update_with_clamp_only_raises_domains_above_their_reference():
    # losses (3.0, 2.0), references (2.0, 2.5): delta = (max(1, 0), max(-0.5, 0)) = (1, 0)
    # alpha ∝ (0.5·e, 0.5·1) -> (e/(e+1), 1/(e+1)) = (0.731059, 0.268941)
    new = update_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.5], clamp=True, smoothing=0.0)
    np.testing.assert_allclose(new, [E / (E + 1), 1 / (E + 1)], rtol=1e-12)
    np.testing.assert_allclose(new, [0.7310586, 0.2689414], atol=1e-7)


def test_update_without_clamp_also_lowers_domains_below_their_reference():
    # delta = (1, -0.5): alpha ∝ (e, e^-0.5) -> (e^1.5/(e^1.5+1), 1/(e^1.5+1)) = (0.817574, 0.182426)
    new = update_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.5], clamp=False, smoothing=0.0)
    np.testing.assert_allclose(new, [E**1.5 / (E**1.5 + 1), 1 / (E**1.5 + 1)], rtol=1e-12)
    np.testing.assert_allclose(new, [0.8175745, 0.1824255], atol=1e-7)


def test_update_of_three_domains_with_smoothing_towards_uniform():
    # w = (0.2, 0.3, 0.5), losses 2.0 each, references (1, 2, 3): clamped delta = (1, 0, 0)
    # alpha ∝ (0.2e, 0.3, 0.5) = (0.543656, 0.3, 0.5), sum 1.343656
    # -> (0.404609, 0.223271, 0.372119); then 0.9·alpha + 0.1/3 -> (0.397482, 0.234278, 0.368240)
    s = 0.2 * E + 0.8
    alpha = np.array([0.2 * E / s, 0.3 / s, 0.5 / s])
    new = update_weights([0.2, 0.3, 0.5], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], clamp=True, smoothing=0.1)
    np.testing.assert_allclose(new, 0.9 * alpha + 0.1 / 3, rtol=1e-12)
    np.testing.assert_allclose(new, [0.397482, 0.234278, 0.368240], atol=1e-6)
    assert new.sum() == pytest.approx(1.0)
    # without the clamp the third domain (loss 1 below its reference) also loses weight:
    # alpha ∝ (0.2e, 0.3, 0.5/e)
    s = 0.2 * E + 0.3 + 0.5 / E
    unclamped = update_weights([0.2, 0.3, 0.5], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], clamp=False, smoothing=0.1)
    np.testing.assert_allclose(unclamped, 0.9 * np.array([0.2 * E, 0.3, 0.5 / E]) / s + 0.1 / 3, rtol=1e-12)


def test_losses_at_or_below_reference_keep_the_weights_and_smoothing_alone_moves_to_uniform():
    w = [0.6, 0.3, 0.1]
    np.testing.assert_allclose(update_weights(w, [1.0, 1.0, 1.0], [1.0, 2.0, 5.0], smoothing=0.0), w, rtol=1e-12)
    np.testing.assert_allclose(
        update_weights(w, [1.0, 1.0, 1.0], [1.0, 2.0, 5.0], smoothing=0.5), [0.5 * 0.6 + 0.5 / 3, 0.5 * 0.3 + 0.5 / 3, 0.5 * 0.1 + 0.5 / 3], rtol=1e-12
    )
    # unnormalised input weights are normalised
    np.testing.assert_allclose(update_weights([6, 3, 1], [1.0] * 3, [1.0] * 3, smoothing=0.0), w, rtol=1e-12)


def test_a_zero_weight_stays_zero_unless_smoothed_and_huge_deltas_do_not_overflow():
    new = update_weights([0.0, 1.0], [9.0, 1.0], [1.0, 1.0], smoothing=0.0)
    np.testing.assert_array_equal(new, [0.0, 1.0])
    np.testing.assert_allclose(update_weights([0.0, 1.0], [9.0, 1.0], [1.0, 1.0], smoothing=1e-2), [0.005, 0.995])
    big = update_weights([0.5, 0.5], [2000.0, 1000.0], [0.0, 0.0], smoothing=0.0)
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, [1.0, 0.0], atol=1e-300)


def test_update_by_domain_name_matches_the_array_form_and_reports_the_deltas():
    w = {"code": 0.25, "prose": 0.75}
    losses = {"prose": 2.0, "code": 3.5}  # another key order than the weights
    ref = {"prose": 2.5, "code": 3.0}
    new = update_weights(w, losses, ref, clamp=True, smoothing=0.0)
    assert list(new) == ["code", "prose"]
    np.testing.assert_allclose([new["code"], new["prose"]], update_weights([0.25, 0.75], [3.5, 2.0], [3.0, 2.5], smoothing=0.0))
    assert deltas(losses, ref, clamp=True) == {"prose": 0.0, "code": 0.5}
    assert deltas(losses, ref, clamp=False) == {"prose": -0.5, "code": 0.5}


# ----------------------------------------------------------------------------------- the sampler
def _domain(n_rows, tag, seq=4):
    """Packed arrays whose 'inputs' row r holds tag·100000 + r (so a served row names itself)."""
    ids = tag * 100_000 + np.arange(n_rows)
    inputs = np.repeat(ids[:, None], seq, axis=1).astype(np.int32)
    return {k: (inputs if k in ("inputs", "targets") else np.ones_like(inputs)).astype(np.float32 if k == "loss_mask" else np.int32) for k in PACKED_KEYS}


def test_sampler_follows_changed_weights_and_never_repeats_a_row_within_an_epoch():
    loader = MixtureLoader({"a": _domain(3000, 1), "b": _domain(3000, 2), "c": _domain(3000, 3)}, 32, weights={"a": 0.7, "b": 0.2, "c": 0.1}, seed=5)
    served = {1: [], 2: [], 3: []}

    def draw(n_batches):
        counts = np.zeros(3)
        for _ in range(n_batches):
            batch = loader.next_batch()
            for d, row in zip(batch["domain_ids"], batch["inputs"][:, 0]):
                counts[d] += 1
                served[int(row) // 100_000].append(int(row))
        return counts / counts.sum()

    first = draw(50)  # 1600 rows
    loader.set_weights({"a": 0.1, "b": 0.3, "c": 0.6})  # e.g. a dynamic update
    second = draw(50)
    # binomial standard deviation at n = 1600 is <= 0.0125: 4 sigma
    np.testing.assert_allclose(first, [0.7, 0.2, 0.1], atol=0.05)
    np.testing.assert_allclose(second, [0.1, 0.3, 0.6], atol=0.05)
    for tag, rows in served.items():
        assert len(rows) < 3000  # still within the first epoch of every domain ...
        assert len(set(rows)) == len(rows), f"domain {tag} served a row twice"  # ... so no row twice


def test_sampler_serves_every_row_once_per_epoch_across_weight_changes():
    loader = MixtureLoader({"a": _domain(40, 1), "b": _domain(1000, 2)}, 8, seed=1)
    rows_a = []
    for i in range(60):
        loader.set_weights({"a": 0.2 + 0.6 * (i % 2), "b": 0.8 - 0.6 * (i % 2)})
        batch = loader.next_batch()
        rows_a += [int(r) for d, r in zip(batch["domain_ids"], batch["inputs"][:, 0]) if d == 0]
    assert len(rows_a) >= 80
    assert sorted(rows_a[:40]) == list(range(100_000, 100_040))  # epoch 0: each row exactly once
    assert sorted(rows_a[40:80]) == list(range(100_000, 100_040))  # epoch 1: again each once


# ----------------------------------------------------------------------------- in the trainer
def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _saved_weights(cfg, step):
    path = cfg.checkpoint_path / str(step) / "data" / "metadata"
    return json.loads(path.read_text())["weights"]


ONE = jax.devices()[:1]  # the tiny runs compile and run faster on one device than on eight fake ones
DYN = [
    "data.dynamic.enabled=true",
    "data.dynamic.every=2",
    "data.dynamic.smoothing=0.0",
    "data.dynamic.reference_losses={arithmetic: 0.0, prose: 100.0}",
    "optim.schedule=constant",
    "train.log_every=1",
]


def test_training_updates_logs_and_checkpoints_the_domain_weights(tiny_config):
    cfg = tiny_config(DYN)  # 6 steps, eval every 3, checkpoints at 3 and 6
    out = run_training(cfg, devices=ONE)
    tags = _scalars(cfg.run_path)
    wa, wp = tags["data/weight/arithmetic"], tags["data/weight/prose"]
    assert [s for s, _ in wa] == [0, 2, 4, 6]
    assert wa[0][1] == pytest.approx(0.5)
    # prose's loss is far below its reference (delta 0); arithmetic's above 0, so its weight grows by
    # exp(delta) each update: w_a' / w_p' = (w_a / w_p) · exp(l_a)
    ev = dict(tags["eval/loss/arithmetic"])
    assert sorted(ev) == [0, 2, 3, 4, 6]  # updates between evaluations evaluate too
    for (s0, a0), (_, p0), (s1, a1), (_, p1) in zip(wa, wp, wa[1:], wp[1:]):
        assert a1 / p1 == pytest.approx(a0 / p0 * math.exp(ev[s1]), rel=1e-5)
        assert a1 + p1 == pytest.approx(1.0, abs=1e-6)
    assert [d for _, d in tags["data/delta/prose"]] == [0.0, 0.0, 0.0]
    assert tags["at_start/reference_loss/prose"] == [(0, 100.0)]
    # every checkpoint holds the weights of its step
    assert _saved_weights(cfg, 3)["arithmetic"] == pytest.approx(wa[1][1], rel=1e-6)
    assert _saved_weights(cfg, 6)["arithmetic"] == pytest.approx(wa[3][1], rel=1e-6)
    assert out["data/weight/arithmetic"] == pytest.approx(wa[3][1], rel=1e-6) and wa[3][1] > 0.99
    # the batches followed the weights: after the first update (~0.99 arithmetic) rows are mostly arithmetic


def test_a_resumed_run_continues_with_the_weights_it_had(tiny_config):
    straight = tiny_config(DYN + ["name=straight", "data.dynamic.clamp=false", "data.dynamic.reference_losses={arithmetic: 5.0, prose: 4.0}"])
    run_training(straight, devices=ONE)
    cut = tiny_config(DYN + ["name=resumed", "train.steps=3", "data.dynamic.clamp=false", "data.dynamic.reference_losses={arithmetic: 5.0, prose: 4.0}"])
    run_training(cut, devices=ONE)  # update at step 2, checkpoint at 3 with those weights
    resumed = tiny_config(DYN + ["name=resumed", "resume=true", "data.dynamic.clamp=false", "data.dynamic.reference_losses={arithmetic: 5.0, prose: 4.0}"])
    run_training(resumed, devices=ONE)
    a, b = _scalars(straight.run_path), _scalars(resumed.run_path)
    w_straight = a["data/weight/prose"]
    assert abs(w_straight[1][1] - 0.5) > 0.05  # the step-2 update moved the weights
    # the resumed run logs the restored weights at step 3, then the same updates as the straight run
    assert dict(b["data/weight/prose"])[3] == w_straight[1][1]
    assert [x for x in b["data/weight/prose"] if x[0] != 3] == w_straight
    assert b["train/loss"] == a["train/loss"]


def test_reference_losses_must_name_exactly_the_runs_domains(tiny_config):
    base = ["data.dynamic.enabled=true"]
    with pytest.raises(ConfigError, match=r"^data\.dynamic\.reference_losses: unknown domain\(s\) 'code'"):
        run_training(tiny_config(base + ["data.dynamic.reference_losses={arithmetic: 1.0, prose: 1.0, code: 1.0}"]))
    with pytest.raises(
        ConfigError,
        match=r"^data\.dynamic\.reference_losses: no reference loss for domain\(s\) "
        r"'prose'",
    ):
        run_training(tiny_config(base + ["data.dynamic.reference_losses={arithmetic: 1.0}"]))
    with pytest.raises(ConfigError, match=r"^data\.dynamic: enabled: needs exactly one of reference_losses"):
        tiny_config(base)
    with pytest.raises(ConfigError, match=r"^data\.dynamic\.reference_run: .*does not exist"):
        run_training(tiny_config(base + ["data.dynamic.reference_run=/nonexistent/run"]))
    assert not tiny_config().run_path.exists()  # refused before anything was written


@pytest.mark.slow
def test_reference_losses_measured_from_a_reference_run_equal_its_eval_losses(tiny_config):
    ref = tiny_config(["name=ref", "model.d_model=48", "model.d_ff=96"])
    ref_out = run_training(ref)
    cfg = tiny_config(DYN[:2] + ["name=dyn", f"data.dynamic.reference_run={ref.run_path}", "train.steps=2"])
    run_training(cfg)
    tags = _scalars(cfg.run_path)
    for d in ("arithmetic", "prose"):
        assert tags[f"at_start/reference_loss/{d}"][0][1] == pytest.approx(ref_out[f"eval/loss/{d}"], rel=1e-5)


@pytest.mark.slow
def test_dynamic_batch_loading_reweights_a_pruning_run_too(tiny_config):
    cfg = tiny_config(DYN + ["method=shear", "prune.target.n_heads=2", "prune.target.d_ff=40", "train.steps=4"])
    out = run_training(cfg)
    tags = _scalars(cfg.run_path)
    assert [s for s, _ in tags["data/weight/arithmetic"]] == [0, 2, 4]
    assert out["data/weight/arithmetic"] > 0.9  # prose (delta 0) lost weight, as in the lm run
    assert "train/shear/lagrangian" in tags
    # a pruning run's parameters are not a plain model: it cannot be the reference
    with pytest.raises(ConfigError, match=r"^data\.dynamic\.reference_run: .* method 'shear'"):
        run_training(tiny_config(DYN[:2] + ["name=other", f"data.dynamic.reference_run={cfg.run_path}"]))
