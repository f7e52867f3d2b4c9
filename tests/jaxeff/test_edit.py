"""jaxeff.edit: task-vector algebra and TIES on hand-computed trees; recipes; `jaxeff merge` on runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxeff.edit import add, analogy, apply_vectors, elect_sign, first_difference, negate, scale, task_vector, ties_merge, transfer, trim
from jaxeff.edit.recipe import load_recipe, recipe_from_dict
from jaxeff.errors import ConfigError, JaxeffError


def T(w, b):
    """A two-parameter tree: w [2, 2] and b [2]."""
    return {"layer": {"kernel": jnp.asarray(w, jnp.float32).reshape(2, 2), "bias": jnp.asarray(b, jnp.float32)}}


def flat(tree):
    return np.concatenate([np.ravel(tree["layer"]["kernel"]), np.ravel(tree["layer"]["bias"])])


BASE = T([1, 2, 3, 4], [0.5, -1])
FT = T([1.5, 0, 3, 8], [0.5, 1])


# ------------------------------------------------------------------------------------------------
# algebra


def test_task_vector_is_finetuned_minus_pretrained_and_adding_it_back_gives_the_finetuned():
    tau = task_vector(FT, BASE)
    np.testing.assert_array_equal(flat(tau), [0.5, -2, 0, 4, 0, 2])
    np.testing.assert_array_equal(flat(apply_vectors(BASE, [tau])), flat(FT))


def test_negation_then_addition_returns_the_original():
    tau = task_vector(FT, BASE)
    forgotten = apply_vectors(BASE, [negate(tau)])
    np.testing.assert_array_equal(flat(forgotten), [0.5, 4, 3, 0, 0.5, -3])
    np.testing.assert_array_equal(flat(apply_vectors(forgotten, [tau])), flat(BASE))
    np.testing.assert_array_equal(flat(apply_vectors(BASE, [tau], [-1.0])), flat(forgotten))


def test_addition_with_per_vector_scales():
    t1, t2 = T([1, 0, 0, 2], [4, 0]), T([0, 2, 0, -2], [0, 8])
    out = apply_vectors(BASE, [t1, t2], [0.5, 0.25])
    np.testing.assert_array_equal(flat(out), [1.5, 2.5, 3, 4.5, 2.5, 1])
    np.testing.assert_array_equal(flat(add(t1, t2, t1)), [2, 2, 0, 2, 8, 8])
    np.testing.assert_array_equal(flat(scale(t2, -0.5)), [0, -1, 0, 1, 0, -4])
    assert flat(apply_vectors(BASE, [])).tolist() == flat(BASE).tolist()


def test_analogy_is_c_plus_b_minus_a():
    a, b, c = T([1, 2, 0, 0], [0, 0]), T([3, 5, 0, 1], [1, 0]), T([10, 0, 1, 1], [0, -1])
    np.testing.assert_array_equal(flat(analogy(a, b, c)), [12, 3, 1, 2, 1, -1])


def test_transfer_adds_the_old_versions_finetuning_change_to_the_new_base():
    old, old_ft, new = T([1, 1, 1, 1], [0, 0]), T([2, 0, 1, 3], [0, 1]), T([5, 5, 5, 5], [2, 2])
    np.testing.assert_array_equal(flat(transfer(new, old, old_ft)), [6, 4, 5, 7, 2, 3])
    np.testing.assert_array_equal(flat(transfer(new, old, old_ft, 0.5)), [5.5, 4.5, 5, 6, 2, 2.5])


def test_bf16_trees_stay_bf16():
    b16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), BASE)
    out = apply_vectors(b16, [task_vector(jax.tree.map(lambda x: x.astype(jnp.bfloat16), FT), b16)], [1.0])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_mismatched_trees_name_the_first_differing_parameter_path():
    wide = {"layer": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(2)}}
    with pytest.raises(JaxeffError, match=r"differ at parameter 'layer/kernel': shape \(2, 2\) in the first, \(2, 3\)"):
        task_vector(BASE, wide)
    extra = {"layer": {**BASE["layer"], "scale": jnp.ones(2)}}
    assert first_difference(BASE, extra) == ("layer/scale", "absent in the first, shape (2,) in the second")
    with pytest.raises(JaxeffError, match="'layer/scale'"):
        apply_vectors(BASE, [extra])
    assert first_difference(BASE, FT) is None


# ------------------------------------------------------------------------------------------------
# TIES


TAUS = [T([4, -1, 2, 0.5], [-3, 1]), T([-2, -3, 1, 0.5], [4, -1]), T([1, 2, 5, 0.1], [2, -1])]


def test_ties_worked_example():
    """k = 0.5 keeps 3 of 6 entries per vector:
    trimmed 1 = [ 4,  0, 2, 0, -3, 0]     trimmed 2 = [-2, -3, 0, 0, 4, 0]     trimmed 3 = [0, 2, 5, 0, 2, 0]
    sum       = [ 2, -1, 7, 0,  3, 0]  -> signs + - + (0->majority +) + (0->+)
    disjoint mean: 4 | -3 | (2+5)/2 | no value: 0 | (4+2)/2 | 0"""
    np.testing.assert_array_equal(flat(trim(TAUS[0], 0.5)), [4, 0, 2, 0, -3, 0])
    np.testing.assert_array_equal(flat(trim(TAUS[1], 0.5)), [-2, -3, 0, 0, 4, 0])
    np.testing.assert_array_equal(flat(trim(TAUS[2], 0.5)), [0, 2, 5, 0, 2, 0])
    merged = ties_merge(TAUS, k=0.5)
    np.testing.assert_array_equal(flat(merged), [4, -3, 3.5, 0, 3, 0])
    np.testing.assert_array_equal(flat(apply_vectors(BASE, [merged], [0.5])), [3, 0.5, 4.75, 4, 2, -1])


def test_ties_with_k_1_keeps_everything_and_averages_the_agreeing_values():
    # sums: [3, -2, 8, 1.1, 3, -1] -> signs + - + + + -
    np.testing.assert_allclose(flat(ties_merge(TAUS, k=1.0)), [2.5, -2, 8 / 3, 1.1 / 3, 3, -1], rtol=1e-6)


def test_trim_scope_global_ranks_the_whole_vector_and_tensor_each_parameter():
    tau = T([1, -4, 3, 2], [0.125, -0.25])
    np.testing.assert_array_equal(flat(trim(tau, 0.5)), [0, -4, 3, 2, 0, 0])
    np.testing.assert_array_equal(flat(trim(tau, 0.5, "tensor")), [0, -4, 3, 0, 0, -0.25])


def test_trim_keeps_ties_at_the_threshold():
    np.testing.assert_array_equal(flat(trim(T([3, -3, 1, 0], [0, 0]), 1 / 6)), [3, -3, 0, 0, 0, 0])


def test_a_zero_sign_sum_takes_the_majority_sign():
    up = elect_sign([T([1, -1, 2, 3], [0, 5])])  # signs + - + + . + -> majority +
    np.testing.assert_array_equal(flat(up), [1, -1, 1, 1, 1, 1])
    down = elect_sign([T([-1, -1, 2, -3], [0, 5])])  # - - + - . + -> majority -
    np.testing.assert_array_equal(flat(down), [-1, -1, 1, -1, -1, 1])


def test_ties_rejects_a_bad_fraction():
    with pytest.raises(JaxeffError, match="ties.k"):
        trim(TAUS[0], 0.0)


# ------------------------------------------------------------------------------------------------
# recipes


def _recipe(tmp_path, **raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_defaults_and_out_override(tmp_path):
    r = load_recipe(_recipe(tmp_path, base="runs/b", models={"a": {"path": "runs/a"}}), out="runs/m")
    assert r.out == "runs/m" and r.method == "task_arithmetic" and r.models["a"].scale == 1.0
    assert r.ties.k == 0.2 and r.ties.lam == 1.0 and r.ties.trim == "global"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"base": "b", "out": "o", "models": {"a": {"path": "x", "scael": 1}}}, "models.a.scael: unknown key"),
        ({"base": "b", "out": "o", "models": {"a": {"scale": 1}}}, "models.a.path: missing"),
        ({"base": "b", "out": "o", "models": {"a": {"path": "x", "scale": "big"}}}, "models.a.scale: "),
        ({"base": "b", "out": "o", "method": "avg", "models": {"a": {"path": "x"}}}, "method: "),
        ({"base": "b", "out": "o", "method": "ties", "ties": {"k": 1.5}, "models": {"a": {"path": "x"}}}, "ties.k: "),
        ({"base": "b", "out": "o", "models": {}}, "models: expected at least one fine-tuned run"),
        ({"out": "o", "models": {"a": {"path": "x"}}}, "base: missing"),
    ],
)
def test_bad_recipe_is_one_line_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(raw)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="^out: no output run folder"):
        load_recipe(_recipe(tmp_path, base="b", models={"a": {"path": "x"}}))
    (tmp_path / "bad.yaml").write_text("base: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "path",
    [
        "configs/edit/task_arithmetic.yaml",
        "configs/edit/ties.yaml",
        "configs/edit/negation.yaml",
        "configs/edit/analogy.yaml",
        "configs/edit/transfer.yaml",
    ],
)
def test_example_recipes_load(path):
    assert load_recipe(path).models


# ------------------------------------------------------------------------------------------------
# runs and the CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders written directly (no training: a merge only needs distinct checkpoints): a base,
    two "fine-tunes" of it (the base plus different random changes), and a run whose config says
    another architecture (d_ff 96; only its config is read before the refusal)."""
    from conftest import TINY
    from jaxeff.config import from_dict
    from jaxeff.models import Transformer, init_params
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer
    from jaxeff.train.step import init_state

    root = tmp_path_factory.mktemp("edit")
    raw = json.loads(json.dumps(TINY))
    raw["logging"] = {"run_dir": str(root / "runs"), "progress": False}
    cfg = from_dict(raw)
    model = Transformer(cfg.model)
    trainer = Trainer(cfg, devices=jax.devices()[:1])

    @jax.jit
    def make(change, key):
        params = init_params(model, jax.random.key(0), (1, 8))
        keys = iter(jax.random.split(key, 100))
        return jax.tree.map(lambda x: x + change * jax.random.normal(next(keys), x.shape), params)

    def save(name, change, seed, **model_changes):
        run_cfg = from_dict({**raw, "name": name, "model": {**raw["model"], **model_changes}})
        state = init_state(make(change, jax.random.key(seed)), trainer.tx, trainer.method, 0)
        ckpt = Checkpointer(run_cfg.checkpoint_path)
        ckpt.save(0, state, data_state={}, config=run_cfg.to_dict())
        ckpt.close()

    save("base", 0.0, 0)
    save("ft_a", 0.02, 1)
    save("ft_p", 0.03, 2)
    save("wide", 0.0, 0, d_ff=96)
    # a LoRA run on the base, with non-zero B (a fresh adapter would equal the base)
    lora_cfg = from_dict({**raw, "name": "lora", "method": "lora"})
    lora_trainer = Trainer(lora_cfg, devices=jax.devices()[:1])
    prepared = lora_trainer.method.prepare_params(make(0.0, jax.random.key(0)), jax.random.key(5))
    prepared["lora"] = jax.tree_util.tree_map_with_path(lambda p, x: x if p[-1].key == "a" else 0.05 * jnp.ones_like(x), prepared["lora"])
    ckpt = Checkpointer(lora_cfg.checkpoint_path)
    ckpt.save(0, init_state(prepared, lora_trainer.tx, lora_trainer.method, 0), data_state={}, config=lora_cfg.to_dict())
    ckpt.close()
    return root


def _params(run):
    from jaxeff.runs import load_model_params

    return jax.tree.map(np.asarray, load_model_params(run)[1])


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_cli_merge_writes_a_run_that_init_from_reads(runs, capsys):
    from jaxeff.cli import main
    from jaxeff.config import from_dict
    from jaxeff.train.loop import Trainer

    r = runs / "runs"
    recipe = _recipe(runs, base=str(r / "base"), models={"a": {"path": str(r / "ft_a"), "scale": 0.5}, "p": {"path": str(r / "ft_p"), "scale": -0.25}})
    assert main(["merge", str(recipe), "--out", str(r / "merged")]) == 0
    assert "merged model saved as run" in capsys.readouterr().out
    base, fa, fp, merged = _params(r / "base"), _params(r / "ft_a"), _params(r / "ft_p"), _params(r / "merged")
    expected = jax.tree.map(lambda b, a, p: b + 0.5 * (a - b) - 0.25 * (p - b), base, fa, fp)
    _close(merged, expected, rtol=1e-6, atol=1e-6)
    summary = json.loads((r / "merged" / "merge.json").read_text())
    assert summary["method"] == "task_arithmetic" and set(summary["vector_norms"]) == {"a", "p"}
    assert (r / "merged" / "config.yaml").is_file()
    saved = yaml.safe_load((r / "merged" / "config.yaml").read_text())
    assert saved["method"] == "lm" and saved["name"] == "merged"
    trainer = Trainer(from_dict({**saved, "train": {**saved["train"], "init_from": str(r / "merged")}}))
    _close(jax.tree.map(np.asarray, trainer.load_base_params(str(r / "merged"))), merged)


def test_ties_and_transfer_recipes_on_runs(runs):
    from jaxeff.edit import recipe_from_dict
    from jaxeff.edit.runs import merge_runs

    r = runs / "runs"
    base, fa, fp = _params(r / "base"), _params(r / "ft_a"), _params(r / "ft_p")
    merge_runs(
        recipe_from_dict(
            {
                "base": str(r / "base"),
                "out": str(r / "ties"),
                "method": "ties",
                "ties": {"k": 0.3, "lam": 0.8},
                "models": {"a": {"path": str(r / "ft_a")}, "p": {"path": str(r / "ft_p")}},
            }
        )
    )
    tv = ties_merge([task_vector(fa, base), task_vector(fp, base)], k=0.3)
    _close(_params(r / "ties"), apply_vectors(base, [tv], [0.8]), rtol=1e-6, atol=1e-6)
    # transfer: ft_p taken as "another base version"; ft_a's change from base is added to it
    merge_runs(recipe_from_dict({"base": str(r / "ft_p"), "out": str(r / "moved"), "models": {"a": {"path": str(r / "ft_a"), "base": str(r / "base")}}}))
    _close(_params(r / "moved"), jax.tree.map(lambda p, a, b: p + (a - b), fp, fa, base), rtol=1e-6, atol=1e-6)


def test_a_lora_run_contributes_its_merged_model_parameters(runs):
    from jaxeff.edit import recipe_from_dict
    from jaxeff.edit.runs import merge_runs
    from jaxeff.runs import load_model_params
    from jaxeff.peft import merge
    from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings
    from jaxeff.train.loop import Trainer

    r = runs / "runs"
    cfg, model_params = load_model_params(r / "lora")
    base = _params(r / "base")
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    ckpt = Checkpointer(r / "lora" / "checkpoints", create=False)  # the raw {base, lora} tree, merged by hand
    raw = ckpt.restore_params(abstract_with_shardings(trainer.abstract_state.params, trainer.param_shardings))
    ckpt.close()
    expected = merge(base, raw["lora"], cfg.peft.alpha / cfg.peft.rank)
    assert any(float(np.max(np.abs(np.asarray(x) - y))) > 1e-3 for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(base)))
    _close(jax.tree.map(np.asarray, model_params), expected, rtol=1e-6, atol=1e-6)
    merge_runs(recipe_from_dict({"base": str(r / "base"), "out": str(r / "from_lora"), "models": {"l": {"path": str(r / "lora"), "scale": 2.0}}}))
    _close(_params(r / "from_lora"), jax.tree.map(lambda b, e: b + 2.0 * (e - b), base, expected), rtol=1e-5, atol=1e-6)


def test_cli_merge_errors_are_one_line_and_write_nothing(runs, capsys):
    from jaxeff.cli import main

    r = runs / "runs"

    def fails(raw, expected, out="bad"):
        recipe = _recipe(runs, **raw)
        assert main(["merge", str(recipe), "--out", str(r / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
        assert out == "merged" or not (r / out).exists()

    fails(
        {"base": str(r / "base"), "models": {"w": {"path": str(r / "wide")}}},
        f"'{r / 'wide'}' has a different architecture from '{r / 'base'}': parameter 'layers_0/mlp/down/kernel' differs",
    )
    fails({"base": str(r / "base"), "models": {"x": {"path": str(r / "nope")}}}, "models.x.path: checkpoint directory")
    fails({"base": str(r / "base"), "models": {"a": {"path": str(r / "ft_a"), "scael": 2}}}, "models.a.scael: unknown key")
    fails({"base": str(r / "base"), "models": {"a": {"path": str(r / "ft_a")}}}, "already holds a checkpoint", out="merged")


@pytest.mark.slow
def test_generate_and_eval_read_a_merged_run(runs, capsys):
    from jaxeff.cli import main

    r = runs / "runs"
    recipe = _recipe(runs, base=str(r / "base"), models={"a": {"path": str(r / "ft_a"), "scale": 0.5}})
    assert main(["merge", str(recipe), "--out", str(r / "merged_gen")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(r / "merged_gen"), "--prompt", "1+1=", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("1+1=")
    assert main(["eval", str(r / "merged_gen" / "config.yaml"), "--checkpoint", str(r / "merged_gen")]) == 0
    assert "eval/loss" in capsys.readouterr().out


def test_the_edit_and_steer_cli_modules_import_without_jax():
    import subprocess
    import sys

    code = "import sys, jaxeff.edit.cli, jaxeff.steer.cli; sys.exit(int('jax' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
