"""TensorBoard (tensorboardX) scalars, the resolved config as text and hparams, and the console
progress bar. Only process 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary
from tqdm.auto import tqdm


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _hparam_value(v):
    """A value TensorBoard's hparams accept: bool, float, str (ints become floats there; one beyond
    float range, and anything else, is logged as text)."""
    if isinstance(v, (bool, float, str)):
        return v
    if isinstance(v, int) and abs(v) < 2**53:  # exact as a float
        return v
    return str(v) if isinstance(v, int) else json.dumps(v)


class RunLogger:
    """One TensorBoard run directory per experiment: ``<run_dir>/<name>``."""

    def __init__(self, run_path: Path, config: dict, *, total_steps: int, start_step: int, progress: bool):
        self.enabled = jax.process_index() == 0
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / "config.yaml").write_text(_yaml(config))
        self.writer = SummaryWriter(logdir=str(run_path), flush_secs=10)
        self.writer.add_text("config", "```yaml\n" + _yaml(config) + "\n```", global_step=start_step)
        flat = {k: _hparam_value(v) for k, v in flatten(config).items()}
        for summary in hparams_summary(flat, {"eval/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), global_step=step)

    def advance(self, n: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        """Write the pending TensorBoard points to disk (called at each checkpoint)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
