"""Hugging Face interop: tiny LLaMA-family checkpoints written here in HF format (safetensors +
config.json) load into jaxeff with the logits of an independent numpy forward of the HF
semantics; save_pretrained round-trips exactly; sharded loading equals one device; bad inputs
fail with one line."""

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.interop import load_pretrained, save_pretrained
from jaxeff.interop.hf import load_weights

BF16 = ml_dtypes.bfloat16

# ------------------------------------------------------------------------------------------------
# tiny HF checkpoints


def make_hf(
    folder,
    *,
    arch="LlamaForCausalLM",
    vocab=61,
    d=32,
    layers=2,
    heads=4,
    kv=2,
    head_dim=None,
    ff=48,
    tie=False,
    theta=10000.0,
    rope=None,
    rope_layout="old",
    bias=False,
    window=None,
    windows=None,
    dtype=np.float32,
    shards=1,
    seed=0,
    extra=None,
):
    """Write a random HF checkpoint; returns (folder, spec) where spec holds what the numpy
    reference needs: the tensors (float64 of the stored values) and the per-layer windows."""
    rng = np.random.default_rng(seed)
    hd = head_dim or d // heads
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch]
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "torch_dtype": {np.float32: "float32", BF16: "bfloat16", np.float16: "float16"}[dtype],
    }
    if head_dim:
        cfg["head_dim"] = head_dim
    if rope_layout == "old":
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = rope
    else:
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(rope or {})}
    if arch == "LlamaForCausalLM":
        cfg.update(attention_bias=bias, mlp_bias=bias)
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = window
    if arch == "Qwen2ForCausalLM":
        cfg.update(use_sliding_window=window is not None, sliding_window=window or 4096, max_window_layers=1 if window else layers)
    cfg.update(extra or {})
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, d)), "model.norm.weight": 1 + 0.1 * rng.normal(size=d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (heads * hd, d),
            "self_attn.k_proj": (kv * hd, d),
            "self_attn.v_proj": (kv * hd, d),
            "self_attn.o_proj": (d, heads * hd),
            "mlp.gate_proj": (ff, d),
            "mlp.up_proj": (ff, d),
            "mlp.down_proj": (d, ff),
        }
        for name, shape in shapes.items():
            t[p + name + ".weight"] = rng.normal(0, 1 / math.sqrt(shape[1]), shape)
            qkv = name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            if bias or (arch == "Qwen2ForCausalLM" and qkv):
                t[p + name + ".bias"] = rng.normal(0, 0.1, shape[0])
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
    if not tie:
        t["lm_head.weight"] = rng.normal(0, 1 / math.sqrt(d), (vocab, d))
    stored = {k: v.astype(dtype) for k, v in t.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(stored)
    if shards == 1:
        save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        parts = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for j, part in enumerate(parts):
            fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: stored[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if windows is None:
        windows = [window] * layers if arch == "MistralForCausalLM" else [None] * layers
    spec = {"cfg": cfg, "t": {k: v.astype(np.float64) for k, v in stored.items()}, "windows": windows}
    return folder, spec


# ------------------------------------------------------------------------------------------------
# independent numpy forward of the Hugging Face LLaMA semantics (float64)


def ref_inv_freq(hd, theta, rope):
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if not rope:
        return inv
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "linear":
        return inv / rope["factor"]
    assert kind == "llama3"
    f, lo, hi, old = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for w in inv:
        wavelen = 2 * math.pi / w
        if wavelen < old / hi:
            out.append(w)
        elif wavelen > old / lo:
            out.append(w / f)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * w / f + s * w)
    return np.array(out)


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def ref_logits(spec, tokens):
    c, t = spec["cfg"], spec["t"]
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    rp = c.get("rope_parameters")
    theta = rp["rope_theta"] if rp else c["rope_theta"]
    rope = (rp if rp and rp.get("rope_type") != "default" else None) if rp else c.get("rope_scaling")
    b, s = tokens.shape
    ang = np.arange(s)[:, None] * ref_inv_freq(hd, theta, rope)[None]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
    x = t["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]

    def lin(name, y):
        out = y @ t[name + ".weight"].T
        return out + t[name + ".bias"] if name + ".bias" in t else out

    i_idx, j_idx = np.arange(s)[:, None], np.arange(s)[None]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms(x, t[p + "input_layernorm.weight"], eps)
        q = lin(p + "self_attn.q_proj", y).reshape(b, s, h, hd)
        k = lin(p + "self_attn.k_proj", y).reshape(b, s, kv, hd)
        v = lin(p + "self_attn.v_proj", y).reshape(b, s, kv, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        allowed = j_idx <= i_idx
        w = spec["windows"][layer]
        if w is not None:
            allowed &= j_idx > i_idx - w
        scores = np.where(allowed, scores, -np.inf)
        p_attn = np.exp(scores - scores.max(-1, keepdims=True))
        p_attn /= p_attn.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", p_attn, v).reshape(b, s, h * hd)
        x = x + lin(p + "self_attn.o_proj", o)
        y = rms(x, t[p + "post_attention_layernorm.weight"], eps)
        g, u = lin(p + "mlp.gate_proj", y), lin(p + "mlp.up_proj", y)
        x = x + lin(p + "mlp.down_proj", g / (1 + np.exp(-g)) * u)
    x = rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def tokens_for(spec, b=2, s=12, seed=1):
    return np.random.default_rng(seed).integers(0, spec["cfg"]["vocab_size"], (b, s)).astype(np.int32)


def logits_of(model, params, tokens):
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(params, tokens), np.float64)


LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama_gqa_untied_llama3_rope": dict(kv=2, rope=LLAMA3),
    "llama_mqa_tied_head_dim_rope_parameters": dict(kv=1, tie=True, head_dim=16, rope=LLAMA3, rope_layout="new"),
    "llama_linear_rope_old_type_key": dict(kv=4, rope={"type": "linear", "factor": 2.0}),
    "llama_attention_and_mlp_bias": dict(bias=True),
    "qwen2_qkv_bias_tied_sliding_upper_layers": dict(arch="Qwen2ForCausalLM", tie=True, window=5, theta=1e6, windows=[None, 5]),
    "mistral_sliding_window_two_shards": dict(arch="MistralForCausalLM", window=4, shards=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_independent_numpy_forward(tmp_path, case):
    folder, spec = make_hf(tmp_path / "hf", **CASES[case])
    model, params = load_pretrained(folder)
    assert model.config.param_dtype == "float32"
    tokens = tokens_for(spec)
    got = logits_of(model, params, tokens)
    assert got.shape == (2, 12, spec["cfg"]["vocab_size"])
    np.testing.assert_allclose(got, ref_logits(spec, tokens), atol=2e-4, rtol=2e-4)


def test_rope_scaling_and_window_matter_to_the_reference(tmp_path):
    """The reference is sensitive to what the cases vary (so those tests can fail)."""
    _, spec = make_hf(tmp_path / "a", rope=LLAMA3)
    tokens = tokens_for(spec)
    base = ref_logits(spec, tokens)
    plain = {**spec, "cfg": {**spec["cfg"], "rope_scaling": None}}
    windowed = {**spec, "windows": [4, 4]}
    assert np.abs(ref_logits(plain, tokens) - base).max() > 1e-2
    assert np.abs(ref_logits(windowed, tokens) - base).max() > 1e-2


def test_bf16_checkpoint_keeps_its_dtype_unless_asked(tmp_path):
    folder, spec = make_hf(tmp_path / "hf", dtype=BF16)
    model, params = load_pretrained(folder)
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = tokens_for(spec)
    ref = ref_logits(spec, tokens)
    np.testing.assert_allclose(logits_of(model, params, tokens), ref, atol=0.15, rtol=0.05)
    model32, params32 = load_pretrained(folder, dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params32))
    np.testing.assert_allclose(logits_of(model32, params32, tokens), ref, atol=2e-4, rtol=2e-4)


def test_float16_checkpoint_loads_as_float32(tmp_path):
    folder, spec = make_hf(tmp_path / "hf", dtype=np.float16)
    model, params = load_pretrained(folder)
    assert model.config.param_dtype == "float32"
    tokens = tokens_for(spec)
    np.testing.assert_allclose(logits_of(model, params, tokens), ref_logits(spec, tokens), atol=2e-4, rtol=2e-4)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize(
    "case",
    ["llama_gqa_untied_llama3_rope", "qwen2_qkv_bias_tied_sliding_upper_layers", "mistral_sliding_window_two_shards", "llama_attention_and_mlp_bias"],
)
def test_save_then_load_is_exact_and_keeps_hf_names(tmp_path, case):
    folder, spec = make_hf(tmp_path / "hf", **CASES[case], dtype=BF16)
    model, params = load_pretrained(folder)
    out = save_pretrained(model, params, tmp_path / "out")
    original, saved = _tensors(folder), _tensors(out)
    assert sorted(saved) == sorted(original)
    for k in original:  # same names, shapes, dtype and bits as the HF original
        assert saved[k].dtype == original[k].dtype and saved[k].shape == original[k].shape, k
        np.testing.assert_array_equal(saved[k].view(np.uint16), original[k].view(np.uint16), err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == spec["cfg"]["architectures"] and cfg["torch_dtype"] == "bfloat16"
    model2, params2 = load_pretrained(out)
    assert model2.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_save_shards_above_the_size_limit_with_an_index(tmp_path):
    folder, _ = make_hf(tmp_path / "hf")
    model, params = load_pretrained(folder)
    out = save_pretrained(model, params, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(x.size * 4 for x in jax.tree.leaves(params))
    _, params2 = load_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    with pytest.raises(CheckpointError, match="already holds"):
        save_pretrained(model, params, out)


def test_save_in_another_dtype(tmp_path):
    folder, spec = make_hf(tmp_path / "hf")
    model, params = load_pretrained(folder)
    out = save_pretrained(model, params, tmp_path / "out", dtype="float16")
    saved = _tensors(out)
    assert all(v.dtype == np.float16 for v in saved.values())
    np.testing.assert_array_equal(saved["lm_head.weight"], spec["t"]["lm_head.weight"].astype(np.float16))


def test_quantized_kernels_are_dequantized_or_refused(tmp_path):
    from pallas_kernels.quant import dequantize, quantize

    folder, _ = make_hf(tmp_path / "hf")
    model, params = load_pretrained(folder)
    kernel = params["layers_0"]["mlp"]["up"]["kernel"]
    qw = quantize(kernel, "int8")
    qparams = jax.tree.map(lambda x: x, params)
    qparams["layers_0"]["mlp"]["up"]["kernel"] = qw
    with pytest.raises(CheckpointError, match="layers_0/mlp/up/kernel is quantized"):
        save_pretrained(model, qparams, tmp_path / "refused", dequantize=False)
    out = save_pretrained(model, qparams, tmp_path / "out")
    saved = _tensors(out)["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(saved, np.asarray(dequantize(qw, jnp.float32)).T)
    assert not np.array_equal(saved, np.asarray(kernel).T)  # it really was quantized


def test_sharded_load_on_8_devices_equals_one_device(tmp_path):
    from jaxeff.train.sharding import build_mesh
    from jaxeff.config import MeshConfig

    assert jax.device_count() == 8
    folder, spec = make_hf(tmp_path / "hf", vocab=64, d=32, heads=4, kv=2, ff=64, shards=2)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, sharded = load_pretrained(folder, mesh=mesh)
    _, single = load_pretrained(folder)
    q = sharded["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (16, 16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)
    tokens = tokens_for(spec, b=4)
    np.testing.assert_allclose(logits_of(model, sharded, tokens), logits_of(model, single, tokens), atol=1e-5)
    np.testing.assert_allclose(logits_of(model, sharded, tokens), ref_logits(spec, tokens), atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------------------------
# errors: one line, CheckpointError / ConfigError


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    folder, _ = make_hf(tmp_path / "hf", extra={"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError) as e:
        load_pretrained(folder)
    msg = _one_line(e)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True with mlp_bias=False"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_size": None}, "hidden_size is missing"),
    ],
)
def test_unsupported_config_combinations_are_refused(tmp_path, extra, match):
    folder, _ = make_hf(tmp_path / "hf", extra=extra)
    with pytest.raises(ConfigError, match=match) as e:
        load_pretrained(folder)
    _one_line(e)


def test_missing_shard_is_named(tmp_path):
    folder, _ = make_hf(tmp_path / "hf", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors listed in") as e:
        load_pretrained(folder)
    _one_line(e)


def test_wrong_tensor_shape_is_named(tmp_path):
    folder, _ = make_hf(tmp_path / "hf", extra={"intermediate_size": 40})  # the file has 48
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.mlp.down_proj.weight has shape \[32, 48\], expected "
        r"\[32, 40\]",
    ) as e:
        load_pretrained(folder)
    _one_line(e)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    folder, spec = make_hf(tmp_path / "hf", tie=True)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="tensor lm_head.weight is missing"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="tensor model.layers.1.* is not part of the model"):
        load_pretrained(folder)


def test_missing_folder_files_and_pytorch_bins(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    folder, _ = make_hf(tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: PyTorch pickles are not read"):
        load_pretrained(folder)


def test_load_weights_casts_to_the_requested_abstract_dtype(tmp_path):
    folder, spec = make_hf(tmp_path / "hf")
    model, params = load_pretrained(folder)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    low = load_weights(folder, abstract, shardings, tied=False)
    np.testing.assert_array_equal(np.asarray(low["lm_head"]["kernel"]), spec["t"]["lm_head.weight"].T.astype(np.float32).astype(BF16))


# ------------------------------------------------------------------------------------------------
# CLI: jaxeff convert, train.init_from: hf:PATH


def _yaml(path, raw):
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def test_convert_prints_the_model_section_that_matches_config_json(tmp_path, capsys):
    import yaml

    from jaxeff.cli import main
    from jaxeff.interop import model_config

    folder, _ = make_hf(tmp_path / "hf", arch="Qwen2ForCausalLM", tie=True, rope=LLAMA3, dtype=BF16)
    assert main(["convert", "--from-hf", str(folder)]) == 0
    section = yaml.safe_load(capsys.readouterr().out)["model"]
    assert section["qkv_bias"] is True and section["rope_scaling"]["factor"] == 4.0
    assert section["param_dtype"] == "bfloat16" and section["vocab_size"] == 61
    from jaxeff.models.config import TransformerConfig

    assert TransformerConfig(**section) == model_config(folder)
    assert main(["convert", "--from-hf", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_run_folder_round_trip_eval_and_generate(tmp_path, capsys):
    from jaxeff.cli import main

    folder, spec = make_hf(tmp_path / "hf", vocab=264, kv=1, rope=LLAMA3)
    run = tmp_path / "runs" / "conv"
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 0
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 2  # never overwritten
    assert (
        main(
            [
                "eval",
                str(run / "config.yaml"),
                "--checkpoint",
                str(run),
                "train.eval_batches=1",
                "data.docs_per_domain=20",
                "data.eval_docs_per_domain=2",
                "data.batch_size=8",
                "data.seq_len=32",
            ]
        )
        == 0
    )
    assert main(["generate", "--checkpoint", str(run), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", str(run), "--to-hf", str(tmp_path / "back")]) == 0
    back = _tensors(tmp_path / "back")
    assert sorted(back) == sorted(spec["t"])
    for k, v in back.items():
        np.testing.assert_array_equal(v, spec["t"][k].astype(np.float32), err_msg=k)


def test_train_init_from_hf_starts_from_the_checkpoint_and_exports(tmp_path, capsys):
    from conftest import TINY
    from jaxeff.cli import main
    from jaxeff.interop.convert import model_section

    folder, spec = make_hf(tmp_path / "hf", vocab=264, d=32, heads=4, kv=2, ff=64)
    raw = {
        **TINY,
        "model": {**model_section(folder), "max_seq_len": 32},
        "logging": {"run_dir": str(tmp_path / "runs"), "progress": False},
        "train": {**TINY["train"], "steps": 2, "eval_every": 2, "init_from": f"hf:{folder}"},
        "optim": {"lr": 0.0, "grad_clip": None},
    }
    cfg = _yaml(tmp_path / "ft.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    assert main(["convert", "--from", str(tmp_path / "runs" / "tiny"), "--to-hf", str(tmp_path / "out")]) == 0
    out = _tensors(tmp_path / "out")  # lr 0: the exported weights are the HF ones, bit for bit
    for k in spec["t"]:
        np.testing.assert_array_equal(out[k], spec["t"][k].astype(np.float32), err_msg=k)
    # a model section that is not the checkpoint's architecture: one line, exit 2
    capsys.readouterr()
    bad = _yaml(tmp_path / "bad.yaml", {**raw, "name": "bad", "model": {**raw["model"], "n_kv_heads": 4}})
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.n_kv_heads is 4 but config.json" in err and len(err.strip().splitlines()) == 1


def test_lora_fine_tune_from_hf_exports_merged_weights(tmp_path):
    from conftest import TINY
    from jaxeff.cli import main
    from jaxeff.interop.convert import model_section

    folder, spec = make_hf(tmp_path / "hf", vocab=264, d=32, heads=4, kv=2, ff=64)
    raw = {
        **TINY,
        "method": "lora",
        "peft": {"rank": 4, "targets": [r"layers_\d+/attn/(q|v)"]},
        "model": {**model_section(folder), "max_seq_len": 32},
        "logging": {"run_dir": str(tmp_path / "runs"), "progress": False},
        "train": {**TINY["train"], "steps": 3, "eval_every": 3, "init_from": f"hf:{folder}"},
        "optim": {"lr": 1e-2},
    }
    assert main(["train", str(_yaml(tmp_path / "lora.yaml", raw))]) == 0
    assert main(["convert", "--from", str(tmp_path / "runs" / "tiny"), "--to-hf", str(tmp_path / "out")]) == 0
    out = _tensors(tmp_path / "out")
    assert sorted(out) == sorted(spec["t"])
    for k, v in out.items():
        original = spec["t"][k].astype(np.float32)
        if k.endswith(("q_proj.weight", "v_proj.weight")):  # adapters merged in
            assert not np.array_equal(v, original) and np.abs(v - original).max() < 0.2, k
        else:  # frozen by LoRA: unchanged, bit for bit
            np.testing.assert_array_equal(v, original, err_msg=k)
    load_pretrained(tmp_path / "out")


def test_save_refuses_what_hugging_face_cannot_hold(tmp_path):
    from jaxeff.models import Transformer, TransformerConfig, init_params

    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    cfg = TransformerConfig(**base, sliding_window=(None, 8))  # per-layer windows without Qwen2's biases
    with pytest.raises(ConfigError, match="per-layer windows export only as Qwen2"):
        save_pretrained(cfg, {}, tmp_path / "a")
    model = Transformer(TransformerConfig(**base, use_bias=True, tie_embeddings=False))
    params = init_params(model, jax.random.key(0))
    params["lm_head"]["bias"] = params["lm_head"]["bias"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head/bias is non-zero"):
        save_pretrained(model, params, tmp_path / "b")
    plain = Transformer(TransformerConfig(**base))
    params = init_params(plain, jax.random.key(0))
    params["layers_0"]["attn"]["q"]["lora_a"] = jnp.zeros((32, 4))
    with pytest.raises(CheckpointError, match="layers_0/attn/q/lora_a has no Hugging Face counterpart"):
        save_pretrained(plain, params, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written before the check


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),  # GQA, tied
        dict(n_heads=4, n_kv_heads=1, tie_embeddings=False),  # MQA, untied
        dict(n_heads=4, qkv_bias=True, tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16"),  # Qwen2 biases
        dict(n_heads=4, use_bias=True, tie_embeddings=False),  # biases everywhere, lm_head bias
        dict(n_heads=3, n_kv_heads=1, head_dim=16, d_ff=40, n_layers=3, sliding_window=(4, None, 4)),  # head_dim
    ],
)
def test_parameter_tree_from_the_config_equals_tracing_init(kw):
    from jaxeff.interop.shapes import abstract_params, param_axes
    from jaxeff.models import Transformer, TransformerConfig, init_params, logical_axes

    cfg = TransformerConfig(**{"vocab_size": 37, "d_model": 24, "n_layers": 2, **kw})
    model = Transformer(cfg)
    traced = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    computed = abstract_params(cfg)
    assert jax.tree.structure(computed) == jax.tree.structure(traced)
    assert jax.tree.leaves(computed) == jax.tree.leaves(traced)  # ShapeDtypeStruct: shape and dtype
    axes = logical_axes(model)
    assert jax.tree.structure(param_axes(cfg)) == jax.tree.structure(axes)
    assert jax.tree.leaves(param_axes(cfg)) == jax.tree.leaves(axes)


@pytest.mark.parametrize("stored, wanted", [(np.float32, np.float32), (BF16, BF16), (BF16, np.float32), (np.float32, BF16), (np.float16, np.float32)])
def test_whole_tensor_reads_transpose_in_blocks_and_cast_exactly(tmp_path, stored, wanted):
    from jaxeff.interop.safetensors_io import ALIGN, Files, TRANSPOSE_ROWS

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(2 * TRANSPOSE_ROWS + 3, 7)), "b": rng.normal(size=(5, 2 * TRANSPOSE_ROWS + 1)), "c": rng.normal(size=(11,))}
    arrays = {k: v.astype(stored) for k, v in arrays.items()}
    save_file(arrays, str(tmp_path / "model.safetensors"))
    files = Files(tmp_path)
    for name, a in arrays.items():
        for transpose in [False, True] if a.ndim == 2 else [False]:
            got = files.tensor(name).read(transpose=transpose, dtype=wanted)
            want = (a.T if transpose else a).astype(wanted)
            assert got.dtype == want.dtype and got.flags.c_contiguous and got.ctypes.data % ALIGN == 0
            np.testing.assert_array_equal(got, want)


def test_truncated_safetensors_file_is_named(tmp_path):
    folder, _ = make_hf(tmp_path / "hf")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="is listed but cannot be read") as e:
        load_pretrained(folder)
    _one_line(e)


def test_loaded_parameters_stay_valid_after_gc_and_overwriting_the_files(tmp_path):
    import gc

    folder, spec = make_hf(tmp_path / "hf", **CASES["llama_gqa_untied_llama3_rope"])
    model, params = load_pretrained(folder)
    gc.collect()  # the loader's mappings and host arrays are gone
    for f in folder.glob("*.safetensors"):  # zeros over the data in place: nothing may still map it
        with open(f, "r+b") as fh:
            n = fh.seek(0, 2)
            fh.seek(4096)
            fh.write(bytes(n - 4096))
    tokens = tokens_for(spec)
    np.testing.assert_allclose(logits_of(model, params, tokens), ref_logits(spec, tokens), atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), spec["t"]["lm_head.weight"].T.astype(np.float32))
