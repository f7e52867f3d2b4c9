"""jaxeff.edit: task vectors and model merging as pure functions over parameter trees.

Tree level (:mod:`jaxeff.edit.arithmetic`): ``task_vector``, ``add``, ``scale``, ``negate``,
``apply_vectors`` (theta_pre + sum lambda_i tau_i), ``analogy``, ``transfer``, ``ties_merge``
(``trim``, ``elect_sign``, ``disjoint_mean``). Run level (:mod:`jaxeff.edit.runs`): ``merge_runs``
carries out a YAML recipe (:mod:`jaxeff.edit.recipe`) and writes a new run folder; from the command
line ``jaxeff merge RECIPE.yaml [--out DIR]``. See docs/edit.md.
"""

# Lazy: `jaxeff.cli` imports this package's cli module for every command, so importing the
# package must not import JAX.
from jaxeff._lazy import lazy_getattr

_EXPORTS = {
    "add": "jaxeff.edit.arithmetic",
    "analogy": "jaxeff.edit.arithmetic",
    "apply_vectors": "jaxeff.edit.arithmetic",
    "check_compatible": "jaxeff.edit.arithmetic",
    "disjoint_mean": "jaxeff.edit.arithmetic",
    "elect_sign": "jaxeff.edit.arithmetic",
    "first_difference": "jaxeff.edit.arithmetic",
    "negate": "jaxeff.edit.arithmetic",
    "scale": "jaxeff.edit.arithmetic",
    "sign_conflicts": "jaxeff.edit.arithmetic",
    "task_vector": "jaxeff.edit.arithmetic",
    "ties_merge": "jaxeff.edit.arithmetic",
    "transfer": "jaxeff.edit.arithmetic",
    "trim": "jaxeff.edit.arithmetic",
    "Recipe": "jaxeff.edit.recipe",
    "load_recipe": "jaxeff.edit.recipe",
    "recipe_from_dict": "jaxeff.edit.recipe",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
