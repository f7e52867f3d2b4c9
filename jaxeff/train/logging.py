"""TensorBoard (tensorboardX) scalars, the resolved config as text and hparams, and the console
progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import sys
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
    """A value TensorBoard's hparams accept: bool, int, float, str (an int beyond 2**53, a list or
    None is logged as text)."""
    if isinstance(v, (bool, float, str)):
        return v
    if isinstance(v, int) and abs(v) < 2**53:
        return v
    return str(v) if isinstance(v, int) or v is None else json.dumps(v)


# always in the hparams table, whatever their value: what a reader compares runs by first
HPARAM_ALWAYS = ("method", "model.d_model", "model.n_layers", "optim.lr", "train.steps", "seed")
# never: where the run is written, how often it logs, the resume flag (not what defines the run)
HPARAM_NEVER = ("name", "resume", "logging.", "checkpoint.", "distributed.", "train.log_every", "train.inject_nan_at_step")


def run_hparams(config: dict) -> dict[str, Any]:
    """The hparams of a run: the keys of ``config`` that differ from the schema defaults, plus
    :data:`HPARAM_ALWAYS` (``model.params`` added: the model's size); ints stay ints."""
    from jaxeff.config import ExperimentConfig, from_dict

    flat = flatten(config)
    defaults = flatten(ExperimentConfig().to_dict())
    out = {}
    for k, v in flat.items():
        if k in HPARAM_ALWAYS or (defaults.get(k, object()) != v and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in HPARAM_NEVER)):
            out[k] = _hparam_value(v)
    try:
        out["model.params"] = from_dict(config).model.param_count()
    except Exception:  # a config that no longer validates (an old run): no size
        pass
    first = [k for k in HPARAM_ALWAYS if k in out]
    return {k: out[k] for k in first + sorted(k for k in out if k not in HPARAM_ALWAYS)}


# headline numbers of each method family: train scalars (last logged value) shown in the hparams table
HEADLINE = ("train/ce", "train/kd", "train/shear/params_ratio", "train/ttt/gain", "params/trainable_pct")


def objective_scalars(logs: dict[str, float]) -> dict[str, float]:
    """``train/ce`` for every method (the method's own cross-entropy metric when its loss is not
    plain cross-entropy: distill's ``ce``, shear's ``shear/lm_loss``; else the loss itself),
    ``train/perplexity`` only where the loss IS cross-entropy, and TTT's ``train/ttt/gain``
    (first minus last chunk loss: what the inner loop buys within a sequence) and shear's
    ``train/shear/params_ratio`` (expected / target parameters: 1 = the target size reached)."""
    out: dict[str, float] = {}
    if "train/ce" in logs:
        pass
    elif "train/shear/lm_loss" in logs:
        out["train/ce"] = logs["train/shear/lm_loss"]
    else:
        out["train/ce"] = logs["train/loss"]
        out["train/perplexity"] = float(math.exp(min(logs["train/loss"], 50.0)))
    if "train/ttt/first_chunk_loss" in logs and "train/ttt/last_chunk_loss" in logs:
        out["train/ttt/gain"] = logs["train/ttt/first_chunk_loss"] - logs["train/ttt/last_chunk_loss"]
    if logs.get("train/shear/target_params"):
        out["train/shear/params_ratio"] = logs["train/shear/expected_params"] / logs["train/shear/target_params"]
    return out


def compiled_memory(trainer, state, batch) -> dict[str, float]:
    """The compiled train step's memory per device (``memory_analysis()``: arguments, outputs,
    temporaries, generated code; aliased = donated input buffers reused for outputs) in bytes, and
    the device's peak bytes in use where it reports memory statistics (GPU/TPU; not CPU). Empty
    when the backend gives no analysis."""
    out: dict[str, float] = {}
    try:
        with trainer._context():
            lowered = trainer._train_step.lower(state, trainer.shard_batch(batch), trainer.frozen)
        ma = lowered.compile().memory_analysis()
    except Exception:  # an executable without analysis (some backends)
        ma = None
    if ma is not None:
        fields = {
            "argument": "argument_size_in_bytes",
            "output": "output_size_in_bytes",
            "temp": "temp_size_in_bytes",
            "generated_code": "generated_code_size_in_bytes",
            "alias": "alias_size_in_bytes",
        }
        for name, attr in fields.items():
            value = getattr(ma, attr, None)
            if value is not None:
                out[f"memory/{name}_bytes"] = float(value)
        if {"memory/argument_bytes", "memory/output_bytes", "memory/temp_bytes"} <= out.keys():
            out["memory/step_total_bytes"] = (
                out["memory/argument_bytes"] + out["memory/output_bytes"] + out["memory/temp_bytes"] - out.get("memory/alias_bytes", 0.0)
            )
    out.update(device_peak_memory())
    return out


def device_peak_memory() -> dict[str, float]:
    """``memory/peak_bytes_in_use`` (most over the local devices) where the device reports it."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(float(stats["peak_bytes_in_use"]))
    return {"memory/peak_bytes_in_use": max(peaks)} if peaks else {}


def log_step_memory(logger: "RunLogger", trainer, state, batch, step: int) -> dict[str, float]:
    """Before the first step: print the compiled train step's memory per device and log it
    (``memory/*``)."""
    if not logger.enabled:
        return {}
    mem = compiled_memory(trainer, state, batch)
    if mem:
        logger.message(memory_line(mem))
        logger.scalars(step, mem)
    return mem


def memory_line(mem: dict[str, float]) -> str:
    gib = lambda b: f"{b / 2**20:,.1f} MiB"
    parts = [f"{k.removeprefix('memory/').removesuffix('_bytes')} {gib(v)}" for k, v in mem.items()]
    return "compiled train step, per device: " + ", ".join(parts)


def _synchronous(writer: SummaryWriter) -> SummaryWriter:
    """``writer`` with each event written to its file when it is logged. tensorboardX hands events to
    a background thread through a queue, and its ``flush()`` flushes the file without waiting for that
    queue: a point logged just before a checkpoint could still be queued when a kill -9 comes, and
    the resumed run would never log it again. Written in the caller's thread, every point logged
    before :meth:`RunLogger.flush` is in the file after it."""
    events = writer._get_file_writer().event_writer  # EventFileWriter: the queue and its thread
    events.add_event = events._ev_writer.write_event  # EventsWriter: locked append to the file
    return writer


class RunLogger:
    """One TensorBoard run directory per experiment: ``<run_dir>/<name>``."""

    def __init__(self, run_path: Path, config: dict, *, total_steps: int, start_step: int, progress: bool):
        self.enabled = jax.process_index() == 0
        self.writer = None
        self.bar = None
        self.wandb = None
        self.hparams: dict[str, Any] = {}
        self.last: dict[str, float] = {}
        if not self.enabled:
            return
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / "config.yaml").write_text(_yaml(config))
        self.writer = _synchronous(SummaryWriter(logdir=str(run_path), flush_secs=10))
        self.writer.add_text("config", "```yaml\n" + _yaml(config) + "\n```", global_step=start_step)
        self.hparams = run_hparams(config)
        self.wandb = _start_wandb(config, run_path, self.hparams)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), global_step=step)
            self.last[k] = float(v)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def finish(self) -> None:
        """The hparams table entry of the run: its hparams (see :func:`run_hparams`) with the final
        eval loss, per-domain eval losses and the method's headline numbers (:data:`HEADLINE`)."""
        if self.writer is None:
            return
        metrics = {k: v for k, v in self.last.items() if k.startswith("eval/loss") or k in HEADLINE}
        if not metrics:
            return
        # metric tags are the run's own series: the table shows each one's last value (final eval loss, ...)
        for summary in hparams_summary(self.hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

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
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(config: dict, run_path: Path, hparams: dict):
    """A Weights & Biases run when ``logging.wandb`` is set and ``wandb`` is installed (the
    ``wandb`` extra); one line on stderr and no W&B when it is missing."""
    settings = (config.get("logging") or {}).get("wandb")
    if not settings:
        return None
    try:
        import wandb
    except ImportError:
        print("warning: logging.wandb is set but wandb is not installed (pip install 'jaxeff[wandb]'); logging to TensorBoard only", file=sys.stderr)
        return None
    kwargs = {k: v for k, v in dict(settings).items() if v is not None}
    kwargs.setdefault("name", config.get("name"))
    return wandb.init(dir=str(run_path), config=config, **kwargs)


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
