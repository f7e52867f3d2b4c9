"""LoRA adapters in Hugging Face PEFT's folder format, both ways.

A PEFT LoRA folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors`` with one pair of tensors per adapted
``nn.Linear``::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

PEFT computes ``W x + (lora_alpha / r) · B (A (dropout(x)))`` (``lora_alpha / sqrt(r)`` with
``use_rslora``); jaxeff's adapter of the kernel ``W [in, out]`` is ``a [in, r]``, ``b [r, out]``
with ``x W + (alpha / rank) · (dropout(x) a) b``: the same computation with ``a = A.T``,
``b = B.T`` and the same scale. Module names come from :func:`jaxeff.interop.hf.hf_name` (the
mapping ``jaxeff convert --to-hf`` uses), so an exported adapter loads onto the converted base
with ``PeftModel.from_pretrained``.

Reading checks everything it can before returning: the files exist, ``peft_type`` is LORA and the
options jaxeff cannot represent are off (DoRA, ``fan_in_fan_out``, trained biases,
``modules_to_save``, per-module ``rank_pattern`` / ``alpha_pattern``), every tensor name maps onto
a Dense kernel of the base, A and B come in pairs of rank ``r`` with the kernel's shapes. Each
mistake is one :class:`~jaxeff.errors.CheckpointError` line naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxeff.errors import CheckpointError
from jaxeff.interop.hf import hf_name
from jaxeff.interop.hf_config import read_json_object
from jaxeff.interop.safetensors_io import ST_DTYPES, Tensor, read_header, write_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> the transformers model (LlamaForCausalLM, ...)
_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight")
Path_ = tuple[str, ...]


def module_name(path: Path_) -> str:
    """HF module name (``model.layers.0.self_attn.q_proj``) of a jaxeff Dense module path
    (``("layers_0", "attn", "q")``), from the interop's parameter-name mapping."""
    name, transposed = hf_name(tuple(path) + ("kernel",))
    if name is None or not transposed or not name.endswith(".weight"):
        raise CheckpointError(f"module {'/'.join(path)} is not a Linear layer of the Hugging Face model")
    return name[: -len(".weight")]


def module_index(like) -> dict[str, tuple[Path_, tuple[int, int]]]:
    """HF module name -> (jaxeff module path, kernel shape [in, out]) for every Dense kernel of
    ``like`` (model parameters, or their ShapeDtypeStructs) that Hugging Face has."""
    out = {}
    for key, leaf in traverse_util.flatten_dict(like).items():
        if key[-1] != "kernel" or len(getattr(leaf, "shape", ())) != 2:
            continue
        try:
            out[module_name(key[:-1])] = (key[:-1], tuple(leaf.shape))
        except CheckpointError:
            continue  # not in the HF model (no adapter can name it)
    return out


def _short_names(paths: list[Path_], like_paths: list[Path_] | None) -> list[str]:
    """``target_modules``: the short module names (q_proj, ...) when every layer's module of that
    kind is adapted, else the full module names (PEFT matches a name or a ``.``-suffix of it)."""
    full = sorted(module_name(p) for p in paths)
    if like_paths is None:
        return full
    every = {module_name(p) for p in like_paths}
    by_short: dict[str, set[str]] = {}
    for n in every:
        by_short.setdefault(n.rsplit(".", 1)[-1], set()).add(n)
    chosen = set(full)
    out: list[str] = []
    for short, names in sorted(by_short.items()):
        if names <= chosen:
            out.append(short)
            chosen -= names
        elif names & chosen:
            out.extend(sorted(names & chosen))
            chosen -= names
    return sorted(out) + sorted(chosen)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def peft_config(*, rank: int, alpha: float, dropout: float, target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict of a jaxeff LoRA adapter (scale = lora_alpha / r)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": _number(alpha),
        "lora_dropout": float(dropout),
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft_adapter(
    directory, adapters, *, rank: int, alpha: float, dropout: float = 0.0, base_model_name_or_path: str | None = None, like=None
) -> Path:
    """Write ``adapters`` (jaxeff's ``lora`` tree: ``{module path: {"a": [in, r], "b": [r, out]}}``)
    as PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` in ``directory``. ``like``
    (the base's parameters, optional) lets ``target_modules`` use short names where possible."""
    d = Path(directory)
    flat = traverse_util.flatten_dict(adapters)
    paths = sorted({k[:-1] for k in flat})
    if not paths:
        raise CheckpointError("the adapter tree is empty: nothing to export")
    entries = []
    for path in paths:
        module = module_name(path)
        for which, key in (("A", "a"), ("B", "b")):
            if path + (key,) not in flat:
                raise CheckpointError(f"adapter of {'/'.join(path)} has no '{key}'")
            x = np.asarray(jax.device_get(flat[path + (key,)]))
            if x.ndim != 2 or x.shape[1 if key == "a" else 0] != rank:
                raise CheckpointError(f"adapter {'/'.join(path)}/{key} has shape {list(x.shape)}; expected rank {rank}")
            dtype = x.dtype.name
            if dtype not in ("float32", "bfloat16", "float16"):
                x, dtype = x.astype(np.float32), "float32"
            t = np.ascontiguousarray(x.T)
            entries.append((f"{PREFIX}{module}.lora_{which}.weight", t.shape, dtype, lambda t=t: t))
    like_paths = sorted(p for p, _ in module_index(like).values()) if like is not None else None
    config = peft_config(
        rank=rank, alpha=alpha, dropout=dropout, target_modules=_short_names(paths, like_paths), base_model_name_or_path=base_model_name_or_path
    )
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / WEIGHTS, entries)
    (d / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return d


# LoraConfig options that change what the adapter computes or which tensors it has; each must be
# off (false / null / empty) for jaxeff to run the adapter exactly
REFUSED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "Conv1D-style [in, out] weights",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA's pooled input",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (applied after invocation tokens only)",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on parameters, not Linear modules",
}


def is_peft_folder(directory) -> bool:
    return (Path(directory) / CONFIG).is_file()


def read_peft_config(directory) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA folder, refused (one line naming the file and the
    field) when jaxeff cannot run it exactly."""
    f = Path(directory) / CONFIG
    if not f.is_file():
        raise CheckpointError(f"adapter folder '{directory}' has no {CONFIG} (expected a PEFT LoRA adapter)")
    raw = read_json_object(f)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"'{f}': peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        v = raw.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"'{f}': {key} must be a positive number (got {v!r})")
    if not float(raw["r"]).is_integer():
        raise CheckpointError(f"'{f}': r must be an integer (got {raw['r']!r})")
    for key, what in REFUSED.items():
        if raw.get(key):
            raise CheckpointError(f"'{f}': {key}={json.dumps(raw[key])} is not supported ({what})")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"'{f}': bias={raw['bias']!r} is not supported (jaxeff LoRA trains no biases: 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise CheckpointError(f"'{f}': {key} is not supported (one r and lora_alpha for every module)")
    if raw.get("modules_to_save"):
        raise CheckpointError(f"'{f}': modules_to_save={raw['modules_to_save']} is not supported (only LoRA A/B tensors)")
    return raw


def peft_scale(raw: dict[str, Any]) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
    r = int(raw["r"])
    return float(raw["lora_alpha"]) / (math.sqrt(r) if raw.get("use_rslora") else r)


def read_peft_adapter(directory, like) -> tuple[dict, dict[str, Any]]:
    """``(adapters, config)`` of a PEFT LoRA folder: ``adapters`` is jaxeff's nested tree of numpy
    arrays (``a [in, r]``, ``b [r, out]``, the file's dtype) for the base whose parameters (or
    ShapeDtypeStructs) are ``like``; ``config`` is adapter_config.json plus ``scale``."""
    d = Path(directory)
    raw = read_peft_config(d)
    rank = int(raw["r"])
    f = d / WEIGHTS
    if not f.is_file():
        bins = " (adapter_model.bin is a PyTorch pickle: save with safe_serialization=True)" if (d / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"adapter folder '{d}' has no {WEIGHTS}{bins}")
    header, start = read_header(f)
    index = module_index(like)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name in sorted(header):
        m = _TENSOR.fullmatch(name)
        if m is None:
            raise CheckpointError(
                f"'{f}': tensor {name} is not a LoRA A/B weight of a Linear module (expected base_model.model.<module>.lora_A.weight / lora_B.weight)"
            )
        module, which = m.group("module"), m.group("which")
        if module not in index:
            known = ", ".join(sorted(index)[:3])
            raise CheckpointError(f"'{f}': tensor {name}: module {module} is not a Linear layer of this model (modules look like {known}, ...)")
        tensor = Tensor(f, name, header[name], start)
        _, (d_in, d_out) = index[module]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        got = tuple(tensor.get_shape())
        if got != want:
            r_axis, io_axis = (0, 1) if which == "A" else (1, 0)
            if len(got) == 2 and got[io_axis] == want[io_axis]:
                raise CheckpointError(f"'{f}': tensor {name} has rank {got[r_axis]} (shape {list(got)}) but {CONFIG} says r={rank}")
            raise CheckpointError(
                f"'{f}': tensor {name} has shape {list(got)}, expected {list(want)} "
                f"({'[r, in]' if which == 'A' else '[out, r]'} for the base's kernel "
                f"[{d_in}, {d_out}] of {'/'.join(index[module][0])})"
            )
        if ST_DTYPES[tensor.get_dtype()] == "float64":
            raise CheckpointError(f"'{f}': tensor {name} is float64; expected float32, bfloat16 or float16")
        widen = np.float32 if tensor.get_dtype() == "F16" else None  # jaxeff has no float16 mode; exact
        found.setdefault(module, {})[which] = tensor.read(transpose=True, dtype=widen)
    if not found:
        raise CheckpointError(f"'{f}' holds no LoRA tensors")
    flat = {}
    for module, pair in sorted(found.items()):
        for which in ("A", "B"):
            if which not in pair:
                raise CheckpointError(f"'{f}': tensor {PREFIX}{module}.lora_{which}.weight is missing (lora_{'B' if which == 'A' else 'A'} is there)")
        path = index[module][0]
        flat[path + ("a",)] = np.asarray(pair["A"])
        flat[path + ("b",)] = np.asarray(pair["B"])
    return traverse_util.unflatten_dict(flat), {**raw, "scale": peft_scale(raw)}


__all__ = [
    "CONFIG",
    "WEIGHTS",
    "module_name",
    "module_index",
    "peft_config",
    "write_peft_adapter",
    "is_peft_folder",
    "read_peft_config",
    "peft_scale",
    "read_peft_adapter",
]
