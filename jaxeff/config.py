"""Typed experiment config: one YAML file per experiment, dotted overrides from the command line.

The schema below is the single place where defaults live. Loading goes
YAML file -> dict -> dotted overrides applied -> pydantic validation -> cross-field checks.
Any mistake (missing file, invalid YAML, unknown key, wrong type, impossible combination) raises
:class:`jaxeff.errors.ConfigError` with one line naming the key and what was expected.

Why pydantic: it validates nested, typed schemas and reports the exact location of each error
(``model.n_layers``), which is what a one-line error for people needs; hand-written validation of
nested dataclasses would re-implement it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from jaxeff.data.dynamic import DynamicBatchConfig
from jaxeff.errors import ConfigError
from jaxeff.models.config import TransformerConfig
from jaxeff.schema import Section as _Section
from jaxeff.schema import read_yaml, validation_message


class DataConfig(_Section):
    """Where tokens come from and how they are packed."""

    source: Literal["synthetic", "files"] = "synthetic"
    # synthetic corpus: named domains (see jaxeff.data.synthetic.DOMAINS)
    domains: tuple[str, ...] = ("arithmetic", "records", "prose", "code", "recall")
    weights: dict[str, float] | None = None  # mixture weights per domain; None = uniform
    docs_per_domain: int = Field(2000, gt=0)
    eval_docs_per_domain: int = Field(64, gt=0)
    doc_len: int | None = Field(None, ge=64)  # max characters per synthetic document; None = 1000
    # local files through Hugging Face `datasets` (text, json/jsonl, parquet)
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # held out from `paths` when no eval_paths
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    seq_len: int = Field(128, gt=1)  # tokens per packed row
    batch_size: int = Field(16, gt=0)  # global batch (rows) per optimizer step
    seed: int = 0
    dynamic: DynamicBatchConfig = Field(default_factory=DynamicBatchConfig)  # dynamic batch loading


class OptimConfig(_Section):
    name: Literal["adamw", "adam", "sgd", "lion"] = "adamw"
    lr: float = Field(3e-4, ge=0.0)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    # weight decay applies to parameters of ndim >= 2 (kernels, embeddings), never to norms/biases
    decay_embeddings: bool = True
    grad_clip: float | None = Field(1.0, gt=0.0)  # global-norm clipping; null = off
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step (the batch is split)

    @field_validator("lr")
    @classmethod
    def _lr_fits_float32(cls, v: float) -> float:
        if not v <= 3.0e38:  # the optimizer computes in float32: a larger lr is inf, every update non-finite
            raise ValueError("expected a learning rate a float32 can hold (at most 3e38)")
        return v


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(4, gt=0)  # per domain
    log_every: int = Field(10, gt=0)
    peak_flops: float | None = Field(None, gt=0)  # per device, FLOP/s; None = look up device kind
    # a run (or checkpoints) folder whose model parameters start this run; hf:DIR = a Hugging Face folder
    init_from: str | None = None
    # NaN/Inf loss or gradient norm: skip the update (halt after max_skips in a row), stop at once, or off
    nonfinite: Literal["skip", "stop", "off"] = "skip"
    max_skips: int = Field(10, gt=0)
    inject_nan_at_step: int | None = Field(None, gt=0)  # tests only: poison this (1-based) step

    @field_validator("nonfinite", mode="before")
    @classmethod
    def _off_is_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


class MeshConfig(_Section):
    """Device mesh axes; -1 takes the remaining devices. Logical axis rules map parameter and
    activation axis names onto mesh axes."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("norm", None),
        ("length", None),
    )


class CheckpointConfig(_Section):
    dir: str | None = None  # default: <logging.run_dir>/<name>/checkpoints
    every: int = Field(100, gt=0)  # steps between checkpoints (the last step is always saved)
    keep: int = Field(3, gt=0)  # newest checkpoints kept on disk
    # resume=true finding only damaged (quarantined, <step>.unreadable) checkpoints refuses to start;
    # true starts from step 0 instead (the quarantined folders are kept)
    restart_if_damaged: bool = False


class LoggingConfig(_Section):
    run_dir: str = "runs"  # TensorBoard runs: <run_dir>/<name>
    progress: bool = True  # console progress bar
    # Weights & Biases: wandb.init keyword arguments, e.g. {project: jaxeff, mode: offline}; null = off
    wandb: dict[str, Any] | None = None


class DistributedConfig(_Section):
    """Multi-process training through jax.distributed (see README)."""

    enabled: bool | Literal["auto"] = "auto"  # auto: when coordinator env/flags are present
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


class ExperimentCore(_Section):
    """The sections every run has; :class:`ExperimentConfig` adds one section per registered method
    (``distill``, ``peft``, ``quant``, ...; see :mod:`jaxeff.train.methods`)."""

    name: str = "experiment"
    seed: int = 0
    method: str = "lm"  # a registered method (jaxeff.train.methods.method_names())
    resume: bool = False  # continue from the newest complete checkpoint of this run
    model: TransformerConfig = Field(default_factory=TransformerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from jaxeff.train.methods import method_names

        names = method_names()
        if v not in names:
            raise ValueError(f"unknown method '{v}' (expected one of {', '.join(names)})")
        return v

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or v in (".", ".."):
            raise ValueError("expected a plain folder name (no '/')")
        return v

    @property
    def run_path(self) -> Path:
        return Path(self.logging.run_dir) / self.name

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_path / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SCHEMA: tuple[tuple, type] | None = None  # (registered sections, the model built from them)


def experiment_schema() -> type[ExperimentCore]:
    """:class:`ExperimentCore` plus one field per registered method section (each read only by its
    methods), built on first use and again when a method registers a new section."""
    global _SCHEMA
    from jaxeff.train.methods import method_sections

    sections = method_sections()
    key = tuple((k, id(c)) for k, c in sections.items())
    if _SCHEMA is None or _SCHEMA[0] != key:
        fields = {k: (c, Field(default_factory=c)) for k, c in sections.items()}
        cls = create_model("ExperimentConfig", __base__=ExperimentCore, __module__=__name__, **fields)
        cls.__doc__ = "One experiment: the core sections and the registered methods' sections."
        _SCHEMA = (key, cls)
    return _SCHEMA[1]


if TYPE_CHECKING:  # for type checkers; at run time the module __getattr__ below builds it
    ExperimentConfig = ExperimentCore


def __getattr__(name: str):
    if name == "ExperimentConfig":  # built from the method registry (import cycles: methods import config)
        return experiment_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# loading


def with_overrides(tree: dict[str, Any], changes) -> dict[str, Any]:
    """A deep copy of the config dict ``tree`` with dotted ``changes`` set: a mapping
    (``{"data.batch_size": 1}``), ``(key, value)`` pairs, or ``key=value`` strings as on the command
    line (values read as YAML, see :func:`parse_overrides`). Missing sections are created; a key
    that passes through a value is one line naming it. The one way every tool changes a config."""
    import copy

    if isinstance(changes, dict):
        items = list(changes.items())
    else:
        items = []
        for change in changes:
            items += parse_overrides([change]) if isinstance(change, str) else [tuple(change)]
    out = copy.deepcopy(tree)
    for dotted, value in items:
        keys = dotted.split(".")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: is a value, cannot set '{dotted}'")
            node = child
        node[keys[-1]] = value
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=3e-4", "model.n_layers=4"]`` -> ``[("optim.lr", 3e-4), ...]`` (values as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e.problem})") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 as a string; people mean a number
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        parsed.append((key, value))
    return parsed


PROVENANCE = "provenance"  # top-level key of a written run's config.yaml: what made it (not validated)


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a config dict (a ``provenance`` mapping, see :func:`run_yaml`, is set aside)."""
    if isinstance(raw, dict) and PROVENANCE in raw:
        raw = {k: v for k, v in raw.items() if k != PROVENANCE}
    try:
        cfg = experiment_schema().model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "<config>")) from None
    check_consistency(cfg)
    return cfg


def provenance_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``provenance`` mapping of a saved run config (empty when it has none)."""
    value = raw.get(PROVENANCE) if isinstance(raw, dict) else None
    return dict(value) if isinstance(value, dict) else {}


def run_dict(cfg: ExperimentConfig, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` as a dict with a leading ``provenance`` mapping (what produced the run: command,
    source, ...) when given; :func:`from_dict` reads it back as ``cfg``."""
    body = cfg.to_dict()
    return {PROVENANCE: dict(provenance), **body} if provenance else body


def run_yaml(cfg: ExperimentConfig, provenance: dict[str, Any] | None = None) -> str:
    """The ``config.yaml`` text of a run written by a command: :func:`run_dict` as YAML."""
    return yaml.safe_dump(run_dict(cfg, provenance), sort_keys=False)


def _read_mapping(p: Path) -> dict[str, Any]:
    loaded = read_yaml(p, "config file")
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{p}': expected a mapping of sections at the top level")
    return loaded


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` depth-first: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def compose_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its bases resolved: ``base: other.yaml`` (or ``defaults: [a.yaml, b.yaml]``,
    merged in order), paths relative to the file naming them, merged depth-first under the file's
    own keys. A cycle or a missing base is one line naming the chain."""
    p = Path(path)
    here = p.resolve()
    if here in _chain:
        names = " -> ".join(str(c) for c in (*_chain, here))
        raise ConfigError(f"config file '{p}': base cycle ({names})")
    raw = _read_mapping(p)
    bases: list[Any] = []
    for key in ("base", "defaults"):
        if key not in raw:
            continue
        value = raw.pop(key)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x for x in items):
            raise ConfigError(f"config file '{p}': {key}: expected a relative path to a YAML file" + (" or a list of them" if key == "defaults" else ""))
        bases += items
    merged: dict[str, Any] = {}
    for item in bases:
        target = p.parent / item
        if not target.is_file():
            raise ConfigError(f"config file '{p}': base '{item}' does not exist (looked for '{target}')")
        merged = merge_trees(merged, compose_file(target, (*_chain, here)))
    return merge_trees(merged, raw)


def resolve_raw(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The config dict of ``path`` (bases composed) with dotted ``overrides`` applied last, and a
    ``train.init_from: hf:DIR`` run's model section read from DIR/config.json (keys the config
    gives win); not validated."""
    raw: dict[str, Any] = with_overrides(compose_file(path) if path is not None else {}, list(overrides))
    init = raw["train"].get("init_from") if isinstance(raw.get("train"), dict) else None
    if isinstance(init, str) and init.startswith("hf:") and (Path(init[3:]) / "config.json").is_file():
        model = raw.get("model")
        if model is None or isinstance(model, dict):  # (a folder without config.json: refused at training)
            from jaxeff.interop.convert import model_section

            raw["model"] = merge_trees(model_section(init[3:]), model or {})
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment file (or only defaults when ``path`` is None; ``base:`` files composed,
    see :func:`compose_file`) and apply overrides."""
    return from_dict(resolve_raw(path, overrides))


# integers end up in numpy / JAX: every one must fit int64, and sizes that become array dimensions int32
INT64_MAX = 2**63 - 1
DIM_MAX = 2**31 - 1
DIMENSIONS = (
    "model.vocab_size",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.head_dim",
    "model.d_ff",
    "model.max_seq_len",
    "data.seq_len",
    "data.batch_size",
)


def _check_int_ranges(tree: Any, path: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_int_ranges(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_int_ranges(v, f"{path}[{i}]")
    elif isinstance(tree, int) and not isinstance(tree, bool):
        limit = DIM_MAX if path in DIMENSIONS else INT64_MAX
        if not -limit - 1 <= tree <= limit:
            what = "at most 2**31-1: it is an array dimension" if limit == DIM_MAX else "an integer from -2**63 to 2**63-1"
            raise ConfigError(f"{path}: {tree} is out of range (expected {what})")


def check_consistency(cfg: ExperimentConfig) -> None:
    """Cross-field checks the per-field types cannot express."""
    _check_int_ranges(cfg.to_dict())
    m, d = cfg.model, cfg.data
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len: {d.seq_len} is above the model's maximum model.max_seq_len={m.max_seq_len}")
    if d.batch_size % cfg.optim.grad_accum:
        raise ConfigError(f"optim.grad_accum: {cfg.optim.grad_accum} must divide data.batch_size={d.batch_size}")
    if d.source == "files" and not d.paths:
        raise ConfigError("data.paths: data.source is 'files' but no paths are given")
    if d.source == "synthetic":
        from jaxeff.data.synthetic import DOMAINS

        for name in d.domains:
            if name not in DOMAINS:
                raise ConfigError(f"data.domains: unknown domain '{name}' (expected one of {', '.join(DOMAINS)})")
        if not d.domains:
            raise ConfigError("data.domains: expected at least one domain")
    if d.weights is not None:
        names = d.domains if d.source == "synthetic" else ("files",)
        for k, w in d.weights.items():
            if k not in names:
                raise ConfigError(f"data.weights: '{k}' is not a domain of this run (expected {', '.join(names)})")
            if w < 0:
                raise ConfigError(f"data.weights.{k}: expected a non-negative weight (got {w})")
        if sum(d.weights.values()) <= 0:
            raise ConfigError("data.weights: expected at least one positive weight")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: expected a positive size or -1 (got {size})")
    if sum(1 for a in ("data", "fsdp", "tensor") if getattr(cfg.mesh, a) == -1) > 1:
        raise ConfigError("mesh: at most one axis may be -1")
