"""Helpers the benchmarks and studies share (run them as scripts: ``python experiments/study_x.py``;
the package is installed, so they import ``jaxeff`` and ``pallas_kernels`` directly, never through
``sys.path``).

* :func:`token_nll`: per-token negative log-likelihood (optax's integer-label cross-entropy, in
  float32), the one definition the studies' hand-written NLLs used to repeat;
* :func:`add_study_args` / :func:`study_dir`: the ``--quick`` / ``--run-dir`` pair every study takes and
  the folder its runs go to (``<run-dir>/<name>_study[_quick]``);
* :func:`verdict`: the one-word "held" / "did NOT hold" of a paper's claim.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def token_nll(logits, targets):
    """``-log p(target)`` per position, float32: ``logits [..., V]``, integer ``targets [...]``."""
    import jax.numpy as jnp
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))


def add_study_args(parser: argparse.ArgumentParser, name: str, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--run-dir", default=str(REPO / "runs"), help=f"runs go to <run-dir>/{name}_study[_quick]/")


def study_dir(args, name: str) -> Path:
    return Path(args.run_dir) / f"{name}_study{'_quick' if args.quick else ''}"


def verdict(held: bool) -> str:
    return "held" if held else "did NOT hold"
