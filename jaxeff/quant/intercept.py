"""Path helpers for the Dense layers of a parameter tree (quantization and pruning).

The interceptor that runs those layers differently (fake quant, quantized kernels, LoRA, input
statistics) is :func:`jaxeff.dense.intercept_dense`.
"""

from __future__ import annotations

from jaxeff.targets import select


def dense_paths(params, pattern: str, key: str = "quant.weight_layers") -> list[str]:
    """Paths of the Dense modules (dicts holding a ``kernel``) of a parameter tree that the rule
    ``pattern`` selects (:func:`jaxeff.targets.select`: whole-path match)."""
    return select(params, pattern, key)


def get_path(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def set_path(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` set to ``value`` (other nodes shared)."""
    head, _, rest = path.partition("/")
    new = dict(tree)
    new[head] = set_path(tree.get(head, {}), rest, value) if rest else value
    return new
