"""``jaxeff merge RECIPE.yaml [--out DIR]``: task arithmetic / TIES over runs, written as a new run.

Registered by :mod:`jaxeff.cli` (``FAMILY_CLIS``); no JAX import at module level.
"""

from __future__ import annotations


def register(sub) -> None:
    m = sub.add_parser("merge", help="merge fine-tuned runs (task arithmetic, TIES, transfer) into a new run")
    m.add_argument("recipe", help="YAML merge recipe, e.g. configs/edit/task_arithmetic.yaml")
    m.add_argument("--out", default=None, help="new run folder (overrides the recipe's 'out')")
    m.set_defaults(handler=cmd_merge)


def cmd_merge(args) -> int:
    from jaxeff.edit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.out)  # a bad recipe fails before JAX is imported
    from jaxeff.edit.runs import merge_runs

    summary = merge_runs(recipe)
    parts = ", ".join(f"{n} x{e.scale:g}" + (f" (from {e.base})" if e.base else "") for n, e in recipe.models.items())
    how = recipe.method if recipe.method == "task_arithmetic" else f"ties k={recipe.ties.k:g} lam={recipe.ties.lam:g}"
    print(f"merged model saved as run {summary['out']} ({how}: {recipe.base} + {parts})")
    return 0
