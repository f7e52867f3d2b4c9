"""Hugging Face ``config.json`` <-> :class:`jaxeff.models.TransformerConfig`.

Supported architectures: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``
(SmolLM2 is a Llama). Both RoPE layouts are read: ``rope_theta`` + ``rope_scaling`` (transformers
4.x) and ``rope_parameters`` (transformers 5.x). Anything the jaxeff model cannot run exactly (a
non-SiLU activation, YaRN / dynamic RoPE, partial rotary, attention bias without MLP bias, ...) is
refused with one :class:`jaxeff.errors.ConfigError` line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models.config import RopeScaling, TransformerConfig

# architecture -> (model_type, defaults of the transformers config class for keys a file may omit)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False}),
    "MistralForCausalLM": (
        "mistral",
        {
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096 * 32,
            "tie_word_embeddings": False,
            "num_key_value_heads": 8,
            "sliding_window": 4096,
        },
    ),
    "Qwen2ForCausalLM": (
        "qwen2",
        {
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "max_window_layers": 28,
        },
    ),
}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder (one line on a missing or invalid file)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face model folder '{path}' does not exist")
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"'{folder}' has no config.json (expected a Hugging Face model folder)")
    return read_json_object(f)


def read_json_object(f: Path) -> dict:
    """The JSON object in file ``f``; anything else is a one-line :class:`CheckpointError`."""
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{f}' is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{f}': expected a JSON object")
    return raw


def architecture_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        named = ", ".join(map(str, archs)) or f"none (model_type {raw.get('model_type')!r})"
        raise ConfigError(f"config.json: architecture {named} is not supported (supported: {supported})")
    return archs[0]


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from either layout."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConfigError("config.json: rope_parameters: expected one dict (per-layer-type RoPE is not supported)")
        theta = params.get("rope_theta", raw.get("rope_theta"))
        scaling = params
    else:
        theta = raw.get("rope_theta")
        scaling = raw.get("rope_scaling")
    if theta is None:
        theta = ARCHITECTURES[architecture_of(raw)][1]["rope_theta"]
    if raw.get("partial_rotary_factor", 1.0) != 1.0 or (scaling or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(type="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        try:
            return float(theta), RopeScaling(
                type="llama3",
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: llama3 RoPE scaling lacks {e.args[0]}") from None
    raise ConfigError(f"config.json: RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def _windows(raw: dict[str, Any], arch: str, n_layers: int):
    """``sliding_window`` for TransformerConfig: None, one int, or a per-layer tuple."""
    window = raw.get("sliding_window", ARCHITECTURES[arch][1].get("sliding_window"))
    if arch == "LlamaForCausalLM":
        return None
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        window = None
    layer_types = raw.get("layer_types")
    if window is None:
        return None
    if layer_types is None and arch == "Qwen2ForCausalLM":
        first = raw.get("max_window_layers", ARCHITECTURES[arch][1]["max_window_layers"])
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if layer_types is None:
        return int(window)
    if len(layer_types) != n_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"config.json: layer_types: expected {n_layers} entries of sliding_attention/full_attention")
    per_layer = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if all(w is None for w in per_layer):
        return None
    return int(window) if all(w is not None for w in per_layer) else per_layer


def _head_dim(raw: dict[str, Any]) -> int | None:
    """Explicit head_dim, or None when it is hidden_size // heads (jaxeff's default)."""
    hd, d, h = raw.get("head_dim"), int(raw["hidden_size"]), int(raw["num_attention_heads"])
    return None if not hd or (d % h == 0 and int(hd) == d // h) else int(hd)


def config_from_hf(raw: dict[str, Any], param_dtype: str = "float32") -> TransformerConfig:
    """The jaxeff model config of a Hugging Face ``config.json`` dict (ConfigError if unsupported)."""
    arch = architecture_of(raw)
    defaults = ARCHITECTURES[arch][1]
    for key in REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(f"config.json: {key} is missing")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (the jaxeff MLP is SwiGLU: silu)")
    attn_bias, mlp_bias = bool(raw.get("attention_bias", False)), bool(raw.get("mlp_bias", False))
    if arch == "Qwen2ForCausalLM":
        if attn_bias or mlp_bias:  # Qwen2 ignores these keys; its q/k/v always have biases
            raise ConfigError("config.json: Qwen2 with attention_bias/mlp_bias is not supported")
        qkv_bias, use_bias = True, False
    elif attn_bias != mlp_bias:
        raise ConfigError(
            f"config.json: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
            "(jaxeff has biases on every projection or on none, or on q/k/v only as in Qwen2)"
        )
    else:
        qkv_bias, use_bias = False, attn_bias
    theta, scaling = _rope(raw)
    n_layers = int(raw["num_hidden_layers"])
    try:
        return TransformerConfig(
            vocab_size=int(raw["vocab_size"]),
            d_model=int(raw["hidden_size"]),
            n_layers=n_layers,
            n_heads=int(raw["num_attention_heads"]),
            n_kv_heads=int(raw.get("num_key_value_heads") or defaults.get("num_key_value_heads") or raw["num_attention_heads"]),
            head_dim=_head_dim(raw),
            d_ff=int(raw["intermediate_size"]),
            max_seq_len=int(raw.get("max_position_embeddings") or defaults["max_position_embeddings"]),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(raw.get("rms_norm_eps") or defaults["rms_norm_eps"]),
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            tie_embeddings=bool(raw.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
            sliding_window=_windows(raw, arch, n_layers),
            param_dtype=param_dtype,
            dtype=param_dtype,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"config.json: {str(e).splitlines()[-1].strip()}") from None


def architecture_for(cfg: TransformerConfig) -> str:
    """The Hugging Face class that runs ``cfg`` exactly (ConfigError when none does)."""
    windows = cfg.windows
    per_layer = len(set(windows)) > 1
    if cfg.qkv_bias and not cfg.use_bias:
        return "Qwen2ForCausalLM"
    if per_layer:
        raise ConfigError("model.sliding_window: per-layer windows export only as Qwen2 (a model with qkv_bias)")
    if windows[0] is not None:
        if cfg.use_bias:
            raise ConfigError("model: sliding_window with use_bias has no Hugging Face equivalent (Mistral has no biases)")
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def config_to_hf(cfg: TransformerConfig, dtype: str) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads back into the same architecture."""
    arch = architecture_for(cfg)
    model_type = ARCHITECTURES[arch][0]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = (
            {"rope_type": "linear", "factor": s.factor}
            if s.type == "linear"
            else {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        )
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.windows[0]
    else:
        windows = cfg.windows
        sizes = {w for w in windows if w is not None}
        if len(sizes) > 1:
            raise ConfigError(f"model.sliding_window: Qwen2 has one window size, got {sorted(sizes)}")
        window = sizes.pop() if sizes else None
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=next((i for i, w in enumerate(windows) if w is not None), cfg.n_layers),
            layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows],
        )
    return out


__all__ = ["ARCHITECTURES", "read_config_json", "architecture_of", "config_from_hf", "config_to_hf", "architecture_for"]
