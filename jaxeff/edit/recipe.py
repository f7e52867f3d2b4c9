"""Merge recipes: one YAML file says which runs to combine, how, and where to write the result.

    base: runs/base                 # theta_pre; the merged run takes this run's config
    out: runs/merged                # new run folder (``jaxeff merge --out`` overrides it)
    method: task_arithmetic         # task_arithmetic | ties
    models:                         # the fine-tuned runs: name -> entry
      arithmetic: {path: runs/ft_arith, scale: 0.5}
      code: {path: runs/ft_code, scale: 0.5}

Each entry's task vector is ``path - base`` where ``base`` defaults to the recipe's ``base``; an
entry with its own ``base`` (the run it was fine-tuned from) adds that change to the recipe's base
instead: fine-tuning transfer between base versions. ``scale < 0`` subtracts (negation);
scales ``+1, +1, -1`` on C, B, A give the analogy ``tau_C + (tau_B - tau_A)``. With ``method: ties``
each task vector is multiplied by its scale, then trimmed / sign-elected / averaged, and the merged
vector is added with ``ties.lam``. Paths are relative to the working directory.

Loading is pure (no JAX): any mistake is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from jaxeff.errors import ConfigError
from jaxeff.schema import Section, read_yaml, validation_message


class ModelEntry(Section):
    path: str  # a run folder (or its checkpoints folder)
    scale: float = 1.0  # lambda_i; negative = negation
    base: str | None = None  # the run this one was fine-tuned from (default: the recipe's base)
    step: int | None = Field(None, ge=0)  # checkpoint step (default: latest)
    base_step: int | None = Field(None, ge=0)  # checkpoint step of this entry's own base


class TiesSettings(Section):
    k: float = Field(0.2, gt=0.0, le=1.0)  # fraction of each task vector's entries kept (by magnitude)
    lam: float = 1.0  # scale of the merged task vector
    trim: Literal["global", "tensor"] = "global"  # rank magnitudes over the whole vector or per parameter


class Recipe(Section):
    base: str
    base_step: int | None = Field(None, ge=0)
    out: str | None = None
    method: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    models: dict[str, ModelEntry]
    ties: TiesSettings = Field(default_factory=TiesSettings)

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, v):
        if not v:
            raise ValueError("expected at least one fine-tuned run")
        return v


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "<recipe>")) from None


def load_recipe(path, out: str | None = None) -> Recipe:
    """Read and validate a recipe file; ``out`` (from ``--out``) replaces the recipe's ``out``."""
    p = Path(path)
    raw = read_yaml(p, "recipe file")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe file '{p}': expected a mapping (base, out, method, models)")
    if out is not None:
        raw["out"] = out
    recipe = recipe_from_dict(raw)
    if not recipe.out:
        raise ConfigError("out: no output run folder (set 'out' in the recipe or pass --out)")
    return recipe


__all__ = ["ModelEntry", "TiesSettings", "Recipe", "recipe_from_dict", "load_recipe"]
