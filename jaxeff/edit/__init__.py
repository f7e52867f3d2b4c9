"""jaxeff.edit: task vectors and model merging as pure functions over parameter trees.

Tree level (:mod:`jaxeff.edit.arithmetic`): ``task_vector``, ``add``, ``scale``, ``negate``,
``apply_vectors`` (theta_pre + sum lambda_i tau_i), ``analogy``, ``transfer``, ``ties_merge``
(``trim``, ``elect_sign``, ``disjoint_mean``). Run level (:mod:`jaxeff.edit.runs`): ``merge_runs``
carries out a YAML recipe (:mod:`jaxeff.edit.recipe`) and writes a new run folder; from the command
line ``jaxeff merge RECIPE.yaml [--out DIR]``. See docs/edit.md.
"""

from jaxeff.edit.arithmetic import (
    add,
    analogy,
    apply_vectors,
    check_compatible,
    disjoint_mean,
    elect_sign,
    first_difference,
    negate,
    scale,
    sign_conflicts,
    task_vector,
    ties_merge,
    transfer,
    trim,
)
from jaxeff.edit.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = ["add", "analogy", "apply_vectors", "check_compatible", "disjoint_mean", "elect_sign", "first_difference",
           "negate", "scale", "sign_conflicts", "task_vector", "ties_merge", "transfer", "trim", "Recipe",
           "load_recipe", "recipe_from_dict"]
