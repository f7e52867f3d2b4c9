"""Which Dense layers a method touches, and how their quantized matmuls run: one rule for PEFT,
quantization (QAT, PTQ, conversion), Wanda / magnitude pruning and lottery tickets.

A rule is a regular expression that must match a Dense module's whole path (``layers_0/attn/q``;
a Dense module is a parameter dict holding a ``kernel``), as qwix's rules do. Several rules select
the union. :data:`BLOCK_PROJECTIONS` (the attention and MLP projections of every block) is every
family's default; embeddings, the (tied) LM head, norms and biases are never selected by it.

Until 2026-12 quantization searched its ``weight_layers`` / ``activation_layers`` regex anywhere in
the path (the shipped default was the prefix ``^layers_\\d+/(attn|mlp)/``). A rule that fully
matches nothing but is found by a search is still read that way, with a one-line deprecation
warning naming the key and the full-match rule to write instead.

``auto`` backend (``peft.kernel_backend``, ``quant.convert.backend``): the Pallas kernel on GPU and
TPU, the plain-jnp reference (dequantize, then matmul) on CPU — interpret mode is for testing
kernels, asked for by name.
"""

from __future__ import annotations

import re
import sys
from typing import Iterable

from jaxeff.errors import ConfigError

BLOCK_PROJECTIONS = (r"layers_\d+/attn/(q|k|v|o)", r"layers_\d+/mlp/(gate|up|down)")
BLOCK_LAYERS = r"layers_\d+/(attn|mlp)/.+"  # every Dense inside a block's attention or MLP

_warned: set[tuple[str, str]] = set()


def dense_modules(params) -> list[str]:
    """'/'-joined paths of every Dense module (a dict holding a ``kernel``) of a parameter tree, in
    tree order."""
    out: list[str] = []

    def walk(node, prefix):
        if isinstance(node, dict):
            if "kernel" in node:
                out.append(prefix)
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(params, "")
    return out


def compile_rules(rules: str | Iterable[str], key: str) -> list[re.Pattern]:
    """The rules as compiled regexes; a malformed one is a ConfigError naming ``key``."""
    out = []
    for rule in [rules] if isinstance(rules, str) else list(rules):
        try:
            out.append(re.compile(rule))
        except re.error as e:
            raise ConfigError(f"{key}: {rule!r} is not a valid regex ({e})") from None
    return out


def select(params, rules: str | Iterable[str], key: str, *, required: bool = False) -> list[str]:
    """Paths of the Dense modules of ``params`` that a rule fully matches (see the module doc for
    the deprecated search reading). ``required``: selecting nothing is a ConfigError naming ``key``
    and showing what paths look like."""
    patterns = compile_rules(rules, key)
    candidates = dense_modules(params)
    chosen = [p for p in candidates if any(r.fullmatch(p) for r in patterns)]
    if not chosen:
        searched = [p for p in candidates if any(r.search(p) for r in patterns)]
        if searched:
            shown = rules if isinstance(rules, str) else list(rules)
            if (key, str(shown)) not in _warned:
                _warned.add((key, str(shown)))
                print(
                    f"warning: {key}: {shown!r} matches no whole module path and is read as a search "
                    f"(deprecated); rules match the whole path now, e.g. {BLOCK_LAYERS!r}",
                    file=sys.stderr,
                )
            chosen = searched
    if required and not chosen:
        shown = ", ".join(candidates[:8])
        raise ConfigError(f"{key}: {rules if isinstance(rules, str) else list(rules)} match no Dense layer (module paths look like: {shown})")
    return chosen


def resolve_kernel_backend(name: str) -> str:
    """``auto`` -> the Pallas kernel (``"auto"`` for pallas_kernels) on GPU/TPU, ``"reference"`` on CPU."""
    if name == "auto":
        import jax

        return "auto" if jax.default_backend() in ("gpu", "tpu") else "reference"
    return name
