"""Helpers the benchmarks and studies share (run them as scripts: ``python experiments/study_x.py``;
the package is installed, so they import ``jaxeff`` and ``pallas_kernels`` directly, never through
``sys.path``).

* :func:`quick_model` / :func:`quick_data` / :func:`quick_overrides`: the ``--quick`` size every study
  shrinks its configs to (d_model 64, d_ff 192, 64-token sequences, a few hundred documents per domain),
  with the few knobs the studies set differently as arguments; :func:`mixture`: a domain mix;
* :func:`token_nll`: per-token negative log-likelihood (optax's integer-label cross-entropy, in
  float32), the one definition the studies' hand-written NLLs used to repeat;
* :func:`add_study_args` / :func:`study_dir`: the ``--quick`` / ``--run-dir`` pair every study takes and
  the folder its runs go to (``<run-dir>/<name>_study[_quick]``, or ``--run-dir`` itself for a study that
  owns it);
* :func:`train_steps` / :func:`train_run`: "train this config with these overrides, from scratch"
  (the run's folder deleted first), timed; :func:`train_base`: the pruning studies' base model
  (``--base RUN`` or one trained in the study folder); :func:`run_worker` / :func:`print_result`: one
  run in a child process, its result as one JSON line;
* :func:`verdict`: the one-word "held" / "did NOT hold" of a paper's claim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"

# --quick: the model and data every study shrinks to (configs/quickstart.yaml is d_model 128, d_ff 384).
QUICK_MODEL = ("model.d_model=64", "model.d_ff=192")
QUICK_SEQ_LEN = "data.seq_len=64"
QUICK_EVAL_DOCS = "data.eval_docs_per_domain=16"


def quick_model(n_layers: int | None = None, max_seq_len: int | None = 128) -> list[str]:
    """d_model 64, d_ff 192; ``n_layers`` / ``max_seq_len`` when not None (None: the config's)."""
    return [
        *QUICK_MODEL,
        *([f"model.n_layers={n_layers}"] if n_layers is not None else []),
        *([f"model.max_seq_len={max_seq_len}"] if max_seq_len is not None else []),
    ]


def quick_docs(docs_per_domain: int = 200) -> list[str]:
    """``docs_per_domain`` training documents per domain and 16 eval documents per domain."""
    return [f"data.docs_per_domain={docs_per_domain}", QUICK_EVAL_DOCS]


def quick_data(docs_per_domain: int | None = 200, eval_batches: int | None = None) -> list[str]:
    """64-token sequences, :func:`quick_docs` (None: the config's corpus) and ``eval_batches`` eval batches
    (None: the config's)."""
    return [
        QUICK_SEQ_LEN,
        *(quick_docs(docs_per_domain) if docs_per_domain is not None else []),
        *([f"train.eval_batches={eval_batches}"] if eval_batches is not None else []),
    ]


def quick_overrides(
    n_layers: int | None = None, max_seq_len: int | None = 128, docs_per_domain: int | None = 200, eval_batches: int | None = None
) -> list[str]:
    """:func:`quick_model` + :func:`quick_data`: a study's ``--quick`` overrides."""
    return quick_model(n_layers, max_seq_len) + quick_data(docs_per_domain, eval_batches)


def mixture(weights: dict[str, float]) -> list[str]:
    """Overrides for a corpus of these domains mixed by these weights (``{domain: weight}``, in order)."""
    return [f"data.domains=[{','.join(weights)}]", "data.weights={" + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}"]


def token_nll(logits, targets):
    """``-log p(target)`` per position, float32: ``logits [..., V]``, integer ``targets [...]``."""
    import jax.numpy as jnp
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))


def add_study_args(
    parser: argparse.ArgumentParser,
    name: str,
    quick_help: str | None = None,
    *,
    folder: str | None = None,
    run_dir: str | Path = RUNS,
    run_dir_help: str | None = None,
    owns_run_dir: bool = False,
) -> None:
    """``--quick`` and ``--run-dir``. The study's runs go to ``<run-dir>/<folder>[_quick]`` (``folder``:
    ``<name>_study`` unless given; ``run_dir``: the flag's default); ``owns_run_dir``: ``--run-dir`` is the
    study's folder itself, default ``runs/<folder>[_quick]``. :func:`study_dir` reads these back."""
    folder = folder or f"{name}_study"
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if owns_run_dir:
        parser.add_argument("--run-dir", default=None, help=run_dir_help or f"default: runs/{folder}[_quick]")
    else:
        parser.add_argument("--run-dir", default=str(run_dir), help=run_dir_help or f"runs go to <run-dir>/{folder}[_quick]/")
    parser.set_defaults(study_folder=folder, study_owns_run_dir=owns_run_dir)


def study_dir(args, *, variant: str = "", tag: str = "") -> Path:
    """The study's folder, ``<folder><variant>[_quick]<tag>`` under ``--run-dir`` (or ``--run-dir`` itself
    when given to a study that owns it, else under ``runs/``); ``args`` from a parser :func:`add_study_args`
    set up."""
    folder = f"{args.study_folder}{variant}{'_quick' if args.quick else ''}{tag}"
    if args.study_owns_run_dir:
        return Path(args.run_dir) if args.run_dir else RUNS / folder
    return Path(args.run_dir) / folder


def train_steps(steps: int, eval_every: int | None = None) -> list[str]:
    """Overrides for a run of ``steps`` steps that evaluates every ``eval_every`` (default: at the end)
    and checkpoints at the end."""
    return [f"train.steps={steps}", f"train.eval_every={eval_every or steps}", f"checkpoint.every={steps}"]


class Trained(NamedTuple):
    """A finished training run: its config, ``run_training``'s result (the final metrics) and seconds."""

    cfg: Any
    out: dict
    wall_s: float

    @property
    def path(self) -> Path:
        return Path(self.cfg.run_path)


def train_run(config, overrides=(), *, fresh: bool = True) -> Trained:
    """Train ``config`` (a YAML path, loaded with ``overrides``, or a loaded config) in this process; ``fresh``:
    its run folder is deleted first (a new run, not a resume). The wall-clock excludes loading."""
    from jaxeff.config import load_config
    from jaxeff.train.loop import run_training

    cfg = load_config(config, list(overrides)) if isinstance(config, (str, Path)) else config
    if fresh:
        shutil.rmtree(cfg.run_path, ignore_errors=True)
    t0 = time.perf_counter()
    out = run_training(cfg)
    return Trained(cfg, out, time.perf_counter() - t0)


def train_base(args, study: Path, overrides: list[str], steps: int) -> Path:
    """The model a pruning study prunes: ``--base RUN`` when given (the study folder is created and kept),
    else a base trained from scratch in a fresh study folder (configs/quickstart.yaml with ``overrides``,
    ``steps`` steps, one checkpoint at the end). Returns the run folder."""
    if args.base is not None:
        study.mkdir(parents=True, exist_ok=True)
        return Path(args.base)
    shutil.rmtree(study, ignore_errors=True)
    run = train_run(
        REPO / "configs" / "quickstart.yaml",
        [*overrides, "name=base", f"logging.run_dir={study}", "logging.progress=false", *train_steps(steps), "checkpoint.keep=1"],
    )
    print(f"base: {steps} steps in {run.wall_s:.0f} s", flush=True)
    return run.path


RESULT = "RESULT "


def print_result(row: dict) -> None:
    """A worker process's result: one ``RESULT <json>`` line on stdout (what :func:`run_worker` reads)."""
    print(RESULT + json.dumps(row), flush=True)


def run_worker(script: str | Path, worker: str, argv: list[str]) -> dict:
    """Run ``python script --worker <worker> *argv`` in a fresh process (each run gets its own memory and
    compilation caches) and return the row of its last :func:`print_result` line; a failed worker's output
    goes to stderr and the study stops."""
    proc = subprocess.run([sys.executable, str(script), "--worker", worker, *argv], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{worker}: run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT) :])


def verdict(held: bool) -> str:
    return "held" if held else "did NOT hold"
