"""Method factories get a MethodContext: shapes and axes worked out once by the trainer, the run's base
read once (QLoRA + train.init_from), and a purpose that keeps training-only inputs (a distillation
teacher) out of tools that only read a run."""

import shutil

import jax
import numpy as np
import pytest

from jaxeff.errors import CheckpointError
from jaxeff.models import Transformer, init_params
from jaxeff.train import methods
from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.methods import Method, MethodContext, make_method, method_names, register_method
from jaxeff.train.runtime import Trainer

QLORA_TARGETS = r"peft.targets=['layers_\d+/attn/(q|v)']"


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Methods registered here leave the registry as they found it."""
    method_names()
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))


def _count_restores(monkeypatch) -> list:
    """Every ``Checkpointer.restore_params`` call from now on, by the folder it read."""
    calls = []
    real = Checkpointer.restore_params

    def counting(self, *args, **kwargs):
        calls.append(self.directory)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "restore_params", counting)
    return calls


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_the_trainer_hands_a_factory_its_shapes_axes_and_purpose(tiny_config):
    seen = []

    @register_method("test_ctx_probe")
    def probe(ctx: MethodContext) -> Method:
        seen.append(ctx)
        return methods.lm_method(ctx)

    cfg = tiny_config(["method=test_ctx_probe", "mesh.data=1"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    loader = Trainer(cfg, devices=jax.devices()[:1], purpose="load")
    (ctx, load_ctx) = seen
    assert ctx.cfg is cfg and ctx.model is trainer.model and ctx.purpose == "train" and ctx.training
    assert load_ctx.purpose == "load" and not load_ctx.training
    assert ctx.abstract_params is trainer.base_abstract  # computed once, by the trainer
    expect = jax.eval_shape(lambda: init_params(trainer.model, jax.random.PRNGKey(cfg.seed), (1, cfg.data.seq_len)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), ctx.abstract_params) == jax.tree.map(lambda x: (x.shape, x.dtype), expect)
    assert jax.tree.structure(ctx.model_axes) == jax.tree.structure(expect)
    # a trainer built to load cannot train
    with pytest.raises(RuntimeError, match="purpose='load'"):
        loader.train_step(loader.init_state(), {})
    with pytest.raises(ValueError, match="MethodContext.purpose: expected one of train, load"):
        MethodContext(cfg, None, None, None, "eval")


def test_base_params_is_the_seeded_init_read_once(tiny_config):
    cfg = tiny_config(["mesh.data=1"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    assert not trainer.context.has_base
    base = trainer.base_params()
    assert trainer.base_params() is base  # cached
    fresh = _flat(trainer.init_state().params)  # the trainer's own random init
    for k, v in _flat(base).items():
        np.testing.assert_array_equal(v, fresh[k])
    trainer.context.release_base()
    assert not trainer.context.has_base


def test_an_old_style_factory_still_works_with_a_deprecation_warning(tiny_config):
    got = []
    with pytest.warns(DeprecationWarning, match=r"register_method\('test_ctx_old'\): factory\(cfg, model\) is deprecated"):

        @register_method("test_ctx_old")
        def old(cfg, model):
            got.append((cfg, model))
            return Method("test_ctx_old", lambda params, batch, rng, *, frozen, deterministic: (0.0, {}))

    cfg = tiny_config(["method=test_ctx_old", "mesh.data=1"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    assert got == [(cfg, trainer.model)] and trainer.method.name == "test_ctx_old"


def test_a_new_style_factory_can_still_be_called_with_cfg_and_model(tiny_config):
    cfg = tiny_config(["method=lottery", "train.steps=8", "mesh.data=1"])
    model = Transformer(cfg.model)
    a = make_method(cfg, model)  # builds the context itself
    b = methods._REGISTRY["lottery"](MethodContext.for_model(cfg, model))
    from jaxeff.prune.lottery import lottery_method

    c = lottery_method(cfg, model)
    assert a.name == b.name == c.name == "lottery"
    base = init_params(model, jax.random.PRNGKey(0), (1, 8))
    shapes = [jax.tree.map(lambda x: x.shape, m.prepare_params(base, jax.random.PRNGKey(1))) for m in (a, b, c)]
    assert shapes[0] == shapes[1] == shapes[2] and set(shapes[0]) >= {"model", "mask"}


def test_frozen_inputs_given_lazily_are_read_only_by_a_trainer_that_trains(tiny_config):
    calls = []

    @register_method("test_ctx_lazy")
    def lazy(ctx: MethodContext) -> Method:
        def frozen():
            calls.append(1)
            return {"w": np.ones((4,), np.float32)}

        def loss(params, batch, rng, *, frozen, deterministic):
            value, _ = methods.lm_forward_loss(ctx.model, params, batch, rng, deterministic)
            return value + 0.0 * frozen["w"].sum(), {}

        return Method("test_ctx_lazy", loss, frozen=frozen)

    cfg = tiny_config(["method=test_ctx_lazy", "mesh.data=1"])
    Trainer(cfg, devices=jax.devices()[:1], purpose="load")
    assert calls == []
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    assert calls == [1]
    np.testing.assert_array_equal(np.asarray(trainer.frozen["w"]), np.ones(4))


def test_qlora_with_init_from_reads_its_base_checkpoint_once(tiny_config, tmp_path, monkeypatch):
    """The factory quantizes the base and the fresh train state starts from it: one read (was two)."""
    from jaxeff.runs import save_model_run
    from jaxeff.train.loop import run_training

    base_cfg = tiny_config(["name=base", "mesh.data=1"])
    base = init_params(Transformer(base_cfg.model), jax.random.PRNGKey(3), (1, 8))
    save_model_run(base, base_cfg)
    cfg = tiny_config(
        ["name=q", "method=qlora", QLORA_TARGETS, f"train.init_from={base_cfg.run_path}", "mesh.data=1", "train.steps=1", "train.eval_every=100"]
    )
    calls = _count_restores(monkeypatch)
    run_training(cfg, devices=jax.devices()[:1])
    assert calls == [base_cfg.checkpoint_path.absolute()]
    # the run's float parameters (embeddings, norms) are the base's
    from jaxeff.runs import load_run

    calls.clear()
    _, trainer, params = load_run(cfg.run_path)
    assert len(calls) == 2  # reading the run: its base (the NF4 kernels are not saved) and its own step
    np.testing.assert_array_equal(np.asarray(params["model"]["embed"]["embedding"]), np.asarray(base["embed"]["embedding"]))


def test_a_distilled_student_reads_after_its_teacher_is_deleted(tiny_config, tmp_path):
    from jaxeff.cli import main
    from jaxeff.distill.teacher import load_teacher
    from jaxeff.runs import load_model_params, load_run
    from jaxeff.train.loop import run_training

    common = ["mesh.data=1", "train.steps=2", "train.eval_every=100", "checkpoint.every=2"]
    teacher = tiny_config(["name=teacher", "model.n_layers=3", *common])
    run_training(teacher, devices=jax.devices()[:1])
    student = tiny_config(
        ["name=student", "method=distill", f"distill.teacher_checkpoint={teacher.run_path}", "model.d_model=48", "distill.cos_weight=0.5", *common]
    )
    run_training(student, devices=jax.devices()[:1])
    with Checkpointer(student.checkpoint_path, create=False) as ckpt:  # trained with a projection (widths differ)
        state, _ = Trainer(student, devices=jax.devices()[:1]).restore(ckpt)
    assert set(state.params) == {"model", "proj"}
    _, before = load_model_params(student.run_path)
    shutil.rmtree(teacher.run_path)

    cfg, params = load_model_params(student.run_path)
    assert cfg.method == "distill"
    for k, v in _flat(before).items():
        np.testing.assert_array_equal(_flat(params)[k], v)
    _, trainer, prepared = load_run(student.run_path)
    assert set(prepared) == {"model"} and trainer.frozen is None  # the student alone, no teacher
    assert main(["eval", "--checkpoint", str(student.run_path)]) == 0
    assert main(["generate", "--checkpoint", str(student.run_path), "--prompt", "1+1=", "--max-new-tokens", "3"]) == 0
    # any method's run is a teacher: here the distilled student, whose own teacher is gone
    t = load_teacher(str(student.run_path), None, tiny_config().model, 32)
    assert t.config.n_layers == 2 and t.config.d_model == 48
    for k, v in _flat(before).items():
        np.testing.assert_array_equal(_flat(t.params)[k], v)
    # training it further needs the teacher: one line naming the key
    with pytest.raises(CheckpointError, match=r"^distill.teacher_checkpoint: .*does not exist"):
        Trainer(student, devices=jax.devices()[:1])
