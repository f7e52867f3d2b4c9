"""Load and save Hugging Face LLaMA-family checkpoints (Llama, Mistral, Qwen2, SmolLM2) from local folders.

::

    model, params = load_pretrained("path/to/Llama-3.2-1B")              # checkpoint's dtype
    model, params = load_pretrained(path, dtype="float32", mesh=mesh)    # placed shard by shard
    out = model.apply({"params": params}, tokens)                        # out.logits [batch, seq, vocab]
    save_pretrained(model, params, "path/to/export")                     # transformers can load it

Weights are read tensor by tensor from the memory-mapped safetensors files: a parameter on one
device is read whole by a worker thread into an aligned host array (transposed there; JAX's CPU
client adopts it without a copy); a sharded one is placed with each device reading only its own
slice (``jax.make_array_from_callback``). The host holds at most a few tensors beyond the placed
parameters. HF ``Linear`` weights are ``[out, in]``; jaxeff kernels are ``[in, out]`` (transposed
here). RoPE needs no permutation: both rotate the two halves of head_dim. float16 checkpoints load
as float32 (jaxeff has no float16 mode; widening is exact). Nothing here touches the network.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.interop.hf_config import config_from_hf, config_to_hf, read_config_json
from jaxeff.interop.safetensors_io import INDEX, NP_TO_ST, SINGLE, ST_DTYPES, Files, write_safetensors
from jaxeff.interop.shapes import abstract_params, param_axes
from jaxeff.models import Transformer
from jaxeff.models.config import TransformerConfig

PROGRESS_MIN_BYTES = 256 * 2**20  # a progress bar for checkpoints at least this large
DEFAULT_SHARD_BYTES = 5 * 2**30  # like transformers' max_shard_size="5GB"
DEVICE_TRANSPOSE_MIN = 2**20  # elements: larger sharded kernels are transposed (and cast) by XLA, not numpy
READ_THREADS = 4  # at most: whole tensors read and transposed on the host in parallel
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints carry

_LAYER = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def hf_name(path: tuple[str, ...]) -> tuple[str | None, bool]:
    """HF tensor name of a jaxeff parameter path and whether it is transposed (kernels).

    ``(None, False)`` for the one jaxeff parameter HF lacks: the untied ``lm_head`` bias of a
    ``use_bias`` model (loaded as zeros; must be zero to save)."""
    if path == ("embed", "embedding"):
        return "model.embed_tokens.weight", False
    if path == ("final_norm", "scale"):
        return "model.norm.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    if path == ("lm_head", "bias"):
        return None, False
    m = re.fullmatch(r"layers_(\d+)", path[0])
    if m and len(path) >= 3 and path[-2] in _LAYER and path[-1] in _LEAF:
        return f"model.layers.{m.group(1)}.{_LAYER[path[-2]]}.{_LEAF[path[-1]]}", path[-1] == "kernel"
    raise CheckpointError(f"parameter {'/'.join(path)} has no Hugging Face counterpart (merge adapters / convert extra parameters into the model first)")


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# ------------------------------------------------------------------------------------------------
# reading


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype: {name} is not supported (float32 or bfloat16)")
    return name


def _place(sl, shape: tuple[int, ...], transpose: bool, dtype, sharding) -> jax.Array:
    """One parameter sharded over several devices; each reads only its own slice of the mapped file.

    Large transposed tensors are placed in HF layout (the transposed sharding) and transposed by
    XLA on the devices, which is several times faster than numpy's strided copy."""
    if transpose and math.prod(shape) >= DEVICE_TRANSPOSE_MIN:
        hf_layout = jax.make_array_from_callback(tuple(reversed(shape)), _transposed(sharding), lambda index: np.asarray(sl[tuple(index)], dtype=dtype))
        return _transposer(sharding)(hf_layout)

    def read(index):
        a = sl[tuple(reversed(index))] if transpose else sl[tuple(index)]
        return np.asarray(a.T if transpose else a, dtype=dtype)

    return jax.make_array_from_callback(shape, sharding, read)


def _transposed(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*reversed(spec)))
    return sharding


@functools.lru_cache(maxsize=None)
def _transposer(sharding):
    return jax.jit(jnp.transpose, out_shardings=sharding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_hf_layout(x, transpose: bool, dtype: str):
    return (x.T if transpose else x).astype(dtype)


def load_weights(folder, abstract, shardings, *, tied: bool, progress: bool | None = None):
    """Parameters shaped like ``abstract`` (a tree of ShapeDtypeStruct, jaxeff layout) from the HF
    safetensors files of ``folder``, each placed on its sharding from ``shardings`` (same tree)."""
    folder = Path(folder)
    files = Files(folder)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    names = [hf_name(_keys(path)) for path, _ in flat]
    wanted = {name for name, _ in names}
    extra = sorted(n for n in files.where if n not in wanted and not IGNORED.search(n) and not (tied and n == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"'{folder}': tensor {extra[0]} is not part of the model config.json describes ({len(extra)} unexpected tensors)")
    total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for _, x in flat)
    bar = _bar(total, total >= PROGRESS_MIN_BYTES if progress is None else progress, f"loading {folder.name}")
    out: list[Any] = [None] * len(flat)
    pending: collections.deque = collections.deque()  # (leaf index, future of the host array)
    workers = min(READ_THREADS, os.cpu_count() or 1)

    def finish(i, host):
        out[i] = jax.device_put(host, shard_leaves[i])  # CPU: adopts the aligned array, no copy
        bar.update(host.nbytes)

    with ThreadPoolExecutor(workers) as pool:
        for i, ((_, x), sharding, (name, transpose)) in enumerate(zip(flat, shard_leaves, names)):
            if name is None:  # lm_head bias of a use_bias model: HF has none
                out[i] = jax.device_put(jnp.zeros(x.shape, x.dtype), sharding)
                continue
            tensor = files.tensor(name)
            got = tuple(tensor.get_shape())
            want = tuple(reversed(x.shape)) if transpose else tuple(x.shape)
            if got != want:
                raise CheckpointError(f"'{folder}': tensor {name} has shape {list(got)}, expected {list(want)} from config.json")
            if len(sharding.device_set) == 1 and sharding.is_fully_addressable:  # whole, by a worker thread
                pending.append((i, pool.submit(tensor.read, transpose=transpose, dtype=x.dtype)))
                while len(pending) > workers:  # at most this many tensors wait on the host
                    j, future = pending.popleft()
                    finish(j, future.result())
            else:
                out[i] = _place(tensor, tuple(x.shape), transpose, x.dtype, sharding)
                tensor.close()
                bar.update(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize)
        while pending:
            j, future = pending.popleft()
            finish(j, future.result())
    bar.close()
    return jax.tree_util.tree_unflatten(treedef, out)


def _bar(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False)


def _checkpoint_dtype(folder: Path) -> str:
    """float32 or bfloat16: the embedding tensor's dtype (float16 widens to float32). Only the header
    is read; an unknown dtype code is a one-line CheckpointError there."""
    stored = ST_DTYPES[Files(folder).tensor("model.embed_tokens.weight").get_dtype()]
    return "bfloat16" if stored == "bfloat16" else "float32"


def model_config(path, dtype=None) -> TransformerConfig:
    """The jaxeff model config of a Hugging Face folder (``dtype=None``: the checkpoint's dtype)."""
    folder = Path(path)
    raw = read_config_json(folder)
    return config_from_hf(raw, _dtype_name(dtype) or _checkpoint_dtype(folder))


def load_pretrained(path, *, dtype=None, mesh: Mesh | None = None, rules=None, progress: bool | None = None):
    """``(model, params)`` from a local Hugging Face folder.

    ``dtype`` (None, "float32", "bfloat16" or a jnp dtype) sets the model's ``param_dtype`` and
    compute ``dtype``; None keeps the checkpoint's (float16 loads as float32). With ``mesh``, every
    parameter is placed with the NamedSharding its logical axes get from ``rules`` (default:
    ``MeshConfig().rules``); without, on the first device."""
    cfg = model_config(path, dtype)
    model = Transformer(cfg)
    abstract = abstract_params(cfg)  # equals jax.eval_shape of init, without tracing the model
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        from jaxeff.config import MeshConfig
        from jaxeff.train.sharding import param_shardings

        shardings = param_shardings(param_axes(cfg), abstract, mesh, rules or MeshConfig().rules)
    return model, load_weights(path, abstract, shardings, tied=cfg.tie_embeddings, progress=progress)


# fields that do not change which parameters a model has or what it computes from them
_FREE = ("attention_impl", "remat", "dropout", "dtype", "param_dtype", "init_std", "max_seq_len")


def check_matches(path, cfg: TransformerConfig, where: str = "train.init_from") -> None:
    """ConfigError unless ``cfg`` (a YAML ``model`` section) is the architecture of the HF folder."""
    hf = dataclasses.asdict(config_from_hf(read_config_json(path)))
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    hf = json.loads(json.dumps(hf))
    for key in hf:
        if key not in _FREE and hf[key] != mine[key]:
            raise ConfigError(
                f"{where}: model.{key} is {mine[key]!r} but config.json of '{path}' gives {hf[key]!r} "
                f"(`jaxeff convert --from-hf {path}` prints the matching model section)"
            )


def load_for_run(path, cfg: TransformerConfig, abstract, shardings):
    """Parameters of an HF folder for a run whose ``model`` section is ``cfg`` (``train.init_from:
    hf:PATH``), cast to the run's ``param_dtype`` and placed on the run's shardings."""
    check_matches(path, cfg)
    return load_weights(path, abstract, shardings, tied=cfg.tie_embeddings)


# ------------------------------------------------------------------------------------------------
# writing


def _host(x) -> np.ndarray:
    """A parameter on this host, whole (gathered across processes when it is not addressable here)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _dequantized(leaf, path: str, dequantize: bool):
    from pallas_kernels.quant import QuantizedWeight, dequantize as deq

    if not isinstance(leaf, QuantizedWeight):
        return leaf
    if not dequantize:
        raise CheckpointError(
            f"parameter {path} is quantized ({leaf.fmt}); Hugging Face safetensors hold float weights: pass dequantize=True or save the float model"
        )
    return deq(leaf, jnp.float32)


def _tensors(model_cfg: TransformerConfig, params, dequantize: bool) -> Iterator[tuple[str, Any, bool]]:
    """(HF name, jaxeff leaf, transposed) for every parameter, checked against the model's shapes."""
    from pallas_kernels.quant import QuantizedWeight

    expected = {_keys(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_params(model_cfg))[0]}
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]:
        keys = _keys(path)
        where = "/".join(keys)
        leaf = _dequantized(leaf, where, dequantize)
        name, transpose = hf_name(keys)
        if keys not in expected:
            raise CheckpointError(f"parameter {where} is not part of the model's config")
        if tuple(leaf.shape) != tuple(expected[keys]):
            raise CheckpointError(f"parameter {where} has shape {list(leaf.shape)}, the model config says {list(expected[keys])}")
        seen.add(keys)
        if name is None:
            if np.any(_host(leaf) != 0):
                raise CheckpointError(f"parameter {where} is non-zero but Hugging Face models have no lm_head bias")
            continue
        yield name, leaf, transpose
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"parameter {'/'.join(missing[0])} is missing from the parameters to save")


def save_pretrained(
    model, params, path, *, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dequantize: bool = True, progress: bool | None = None
) -> Path:
    """Write ``params`` as a Hugging Face folder: ``config.json`` and ``model.safetensors`` (or
    shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``).

    ``model`` is a :class:`Transformer` or its :class:`TransformerConfig`. ``dtype`` (default: the
    model's ``param_dtype``) may also be "float16". ``QuantizedWeight`` kernels are dequantized
    (``dequantize=False`` refuses them). The folder must not already hold a checkpoint."""
    cfg = model.config if isinstance(model, Transformer) else model
    out_dtype = jnp.dtype(dtype or cfg.param_dtype).name
    if out_dtype not in NP_TO_ST:
        raise ConfigError(f"dtype: {out_dtype} cannot be saved (float32, bfloat16 or float16)")
    hf_config = config_to_hf(cfg, out_dtype)
    folder = Path(path)
    if folder.exists() and (any(folder.glob("model*.safetensors")) or (folder / INDEX).exists()):
        raise CheckpointError(f"'{folder}' already holds a safetensors checkpoint; choose an empty folder")
    tensors = list(_tensors(cfg, params, dequantize))
    itemsize = np.dtype(out_dtype).itemsize
    shards: list[list[tuple[str, Any, bool]]] = [[]]
    size = 0
    for t in tensors:
        n = math.prod(t[1].shape) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    total = sum(math.prod(t[1].shape) * itemsize for t in tensors)
    write = jax.process_index() == 0
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    show = (total >= PROGRESS_MIN_BYTES if progress is None else progress) and write
    bar = _bar(total, show, f"saving {folder.name}")
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}

    def producer(leaf, transpose):
        def produce():
            if math.prod(leaf.shape) >= DEVICE_TRANSPOSE_MIN:
                a = _host(_to_hf_layout(leaf, transpose, out_dtype))
            else:
                a = _host(leaf)
                a = (a.T if transpose else a).astype(out_dtype)
            bar.update(a.size * itemsize)
            return a

        return produce

    for file, shard in zip(names, shards):
        entries = [(name, tuple(reversed(leaf.shape)) if tr else tuple(leaf.shape), out_dtype, producer(leaf, tr)) for name, leaf, tr in shard]
        if write:
            write_safetensors(folder / file, entries)
        else:  # other processes take part in the gathers
            for *_, produce in entries:
                produce()
        weight_map.update({name: file for name, *_ in shard})
    bar.close()
    if write:
        if len(shards) > 1:
            (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return folder


__all__ = ["load_pretrained", "save_pretrained", "model_config", "load_weights", "load_for_run", "check_matches", "hf_name"]
