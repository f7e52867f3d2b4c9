"""Merging runs: read the checkpoints a recipe names, combine their parameters, write a new run.

The new run is a plain ``method: lm`` run folder (``<out>/checkpoints/0`` + ``config.yaml`` +
``merge.json``) with the recipe base's config, so ``jaxeff eval``, ``jaxeff generate`` and
``train.init_from`` read it like any other. Runs trained with any method contribute their model
parameters (``Method.model_params``: LoRA adapters merged, etc.).

Everything that can reject the input is checked before any weights are read and before anything is
written: the recipe, the checkpoint folders, the output folder, and the architectures (a different
parameter tree names the first differing parameter path; a different model setting with the same
parameters names the ``model.*`` key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxeff.edit.recipe import Recipe
from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.runs import abstract_model_params, load_model_params, read_config
from jaxeff.train.checkpoint import new_lm_run, one_device_config


def _one_device_config(saved: dict, **changes):
    """The config of a saved run, on one device (mesh 1x1x1, batch 1), with dotted ``changes``."""
    return one_device_config(saved, **{"data.batch_size": 1, **changes})


def check_same_architecture(base_cfg: dict, other_cfg: dict, base_name: str, other_name: str) -> None:
    """Parameter trees first (naming the first differing parameter path), then the model settings."""
    from jaxeff.edit.arithmetic import first_difference
    from jaxeff.train.checkpoint import check_same_model

    diff = first_difference(abstract_model_params(base_cfg), abstract_model_params(other_cfg))
    if diff is not None:
        what = diff[1].replace("the first", base_name).replace("the second", other_name)
        raise CheckpointError(f"'{other_name}' has a different architecture from '{base_name}': parameter '{diff[0]}' differs ({what})")
    check_same_model(other_cfg, base_cfg["model"], Path(other_name))


def merge_runs(recipe: Recipe) -> dict[str, Any]:
    """Carry out a recipe; returns a summary (out folder, per-vector norms, ...), also saved as
    ``<out>/merge.json``."""
    import jax
    import numpy as np
    from jaxeff.edit import arithmetic as ta

    out = Path(recipe.out)
    # -- checks, before any weights are read
    from jaxeff.runs import check_new_run

    check_new_run(out, "out")
    runs = {("base", recipe.base): (recipe.base, recipe.base_step)}
    for name, e in recipe.models.items():
        runs[(f"models.{name}.path", e.path)] = (e.path, e.step)
        if e.base is not None:
            runs[(f"models.{name}.base", e.base)] = (e.base, e.base_step)
    configs = {}
    for (key, _), (path, step) in runs.items():
        try:
            configs[path, step] = read_config(path, step)
        except CheckpointError as err:
            raise CheckpointError(f"{key}: {err}") from None
        if Path(path).absolute() == out.absolute():
            raise ConfigError(f"out: '{out}' is also an input of the recipe ({key})")
    base_cfg = configs[recipe.base, recipe.base_step]
    for (key, _), (path, step) in runs.items():
        if key != "base":
            check_same_architecture(base_cfg, configs[path, step], recipe.base, path)

    # -- load and combine
    loaded: dict[tuple[str, int | None], Any] = {}

    def params_of(path, step):
        if (path, step) not in loaded:
            loaded[path, step] = load_model_params(path, step)[1]
        return loaded[path, step]

    base = params_of(recipe.base, recipe.base_step)
    names, vectors, scales = [], [], []
    for name, e in recipe.models.items():
        own_base = base if e.base is None else params_of(e.base, e.base_step)
        vectors.append(ta.task_vector(params_of(e.path, e.step), own_base))
        names.append(name)
        scales.append(e.scale)
    summary: dict[str, Any] = {
        "method": recipe.method,
        "base": str(recipe.base),
        "out": str(out),
        "recipe": recipe.model_dump(mode="json"),
        "vector_norms": {n: _norm(v) for n, v in zip(names, vectors)},
    }
    if recipe.method == "task_arithmetic":
        merged = ta.apply_vectors(base, vectors, scales)
    else:
        scaled = [ta.scale(v, s) for v, s in zip(vectors, scales)]
        trimmed = [ta.trim(v, recipe.ties.k, recipe.ties.trim) for v in scaled]
        summary["ties_sign_conflicts"] = ta.sign_conflicts(trimmed)
        merged_vector = ta.disjoint_mean(trimmed, ta.elect_sign(trimmed))
        summary["merged_vector_norm"] = _norm(merged_vector)
        merged = ta.apply_vectors(base, [merged_vector], [recipe.ties.lam])
    loaded.clear()  # the inputs can go before the merged run is written
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(merged)):
        raise ConfigError("models: the merged parameters are not finite (check the scales)")

    # -- write the new run
    from jaxeff.config import from_dict, with_overrides

    from jaxeff.runs import save_model_run

    cfg = from_dict(with_overrides(base_cfg, new_lm_run(out)))  # the base's config (mesh, batch) as a plain lm run
    provenance = {
        "command": "jaxeff merge",
        "method": recipe.method,
        "base": str(Path(recipe.base).absolute()),
        "models": {n: str(Path(e.path).absolute()) for n, e in recipe.models.items()},
        "data": "as the base run",
    }
    save_model_run(jax.device_put(merged, jax.devices()[0]), cfg, provenance=provenance, key="out")
    (out / "merge.json").write_text(json.dumps(summary, indent=1))
    return summary


def _norm(tree) -> float:
    import jax
    import numpy as np

    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


__all__ = ["merge_runs", "check_same_architecture"]
