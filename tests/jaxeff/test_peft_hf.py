"""LoRA adapters in Hugging Face PEFT's format: export, import, merge, start a run from one.

PEFT folders are built here the way PEFT writes them (``adapter_config.json`` and
``adapter_model.safetensors`` through the ``safetensors`` numpy API, ``[r, in]`` A and ``[out, r]``
B under ``base_model.model.<module>.lora_{A,B}.weight``), without torch. The comparison with real
PEFT + torch is experiments/check_peft.py (not in CI)."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.models import Transformer, TransformerConfig, init_params
from jaxeff.peft import apply_lora, init_adapters, merge, target_paths
from jaxeff.peft.adapters import AdapterSet, fingerprint, load_adapter, save_adapter
from jaxeff.peft.hf_adapter import module_name

CFG = TransformerConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
ALL = [r"layers_\d+/attn/(q|k|v|o)", r"layers_\d+/mlp/(gate|up|down)"]
HF_SHORT = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    model = Transformer(CFG)
    return model, init_params(model, jax.random.key(0))


def _model_dict():
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(CFG)))


def _random_adapters(params, paths, rank, seed=1, dtype=jnp.float32):
    """Adapters with B != 0 (a fresh B is zero, which would make every comparison trivial)."""
    ad = init_adapters(params, paths, rank, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (x if p[-1].key == "a" else 0.05 * jax.random.normal(jax.random.key(seed + 7), x.shape)).astype(dtype), ad
    )


def _meta(params, rank, alpha, base_path="hf:models/tiny-llama"):
    return {
        "method": "lora",
        "rank": rank,
        "alpha": alpha,
        "scale": alpha / rank,
        "dropout": 0.05,
        "targets": ALL,
        "base_fingerprint": fingerprint(params, _model_dict()),
        "base_path": base_path,
        "base_model": _model_dict(),
    }


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 16), 0, CFG.vocab_size)


def _peft_folder(d, tensors: dict, **config):
    """A folder as PEFT's ``save_pretrained`` lays it out (numpy safetensors, no torch)."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": "some/llama",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
        **config,
    }
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def _peft_tensors(modules, rank, seed=0, shapes=None):
    """``{name: array}`` for HF modules ``[(name, in, out)]``: A [r, in] and B [out, r], float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, d_in, d_out in modules:
        out[f"base_model.model.{name}.lora_A.weight"] = rng.normal(0, d_in**-0.5, (rank, d_in)).astype(np.float32)
        out[f"base_model.model.{name}.lora_B.weight"] = rng.normal(0, 0.05, (d_out, rank)).astype(np.float32)
    return out


def _qv_modules(params):
    """(HF name, in, out) of every layer's q_proj and v_proj."""
    return [(module_name(p), *params[p[0]][p[1]][p[2]]["kernel"].shape) for p in target_paths(params, [r"layers_\d+/attn/(q|v)"])]


def _reference_merged(params, tensors, scale):
    """The merged parameters computed independently in float64 from the PEFT tensors:
    PEFT's Linear weight [out, in] gains scale · B A, i.e. jaxeff's kernel [in, out] gains (scale · B A).T."""
    flat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    for layer in range(CFG.n_layers):
        for short, key in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            name = f"base_model.model.model.layers.{layer}.self_attn.{key}"
            if f"{name}.lora_A.weight" in tensors:
                a = tensors[f"{name}.lora_A.weight"].astype(np.float64)
                b = tensors[f"{name}.lora_B.weight"].astype(np.float64)
                flat[(f"layers_{layer}", "attn", short, "kernel")] += (scale * b @ a).T
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})


# ------------------------------------------------------------------------------------------------
# export: PEFT's layout


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_saved_adapter_is_peft_layout_and_round_trips_bit_for_bit(base, tmp_path, dtype):
    model, params = base
    paths = target_paths(params, ALL)
    ad = _random_adapters(params, paths, 4, dtype=dtype)
    save_adapter(tmp_path / "ad", ad, _meta(params, 4, 16.0), like=params)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.05
    assert cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False
    assert cfg["base_model_name_or_path"] == "models/tiny-llama"  # hf:DIR -> DIR
    assert sorted(cfg["target_modules"]) == HF_SHORT  # every layer adapted: short names
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(paths)
    flat = traverse_util.flatten_dict(jax.device_get(ad))
    q0a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert q0a.shape == (4, CFG.d_model) and q0a.dtype == np.dtype(jnp.dtype(dtype))  # [r, in]
    np.testing.assert_array_equal(q0a, np.asarray(flat[("layers_0", "attn", "q", "a")]).T)
    down1b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert down1b.shape == (CFG.d_model, 4)  # [out, r]
    np.testing.assert_array_equal(down1b, np.asarray(flat[("layers_1", "mlp", "down", "b")]).T)
    loaded, meta = load_adapter(tmp_path / "ad", base=params, model_cfg=_model_dict())
    assert meta["scale"] == 4.0 and meta["format"] == "jaxeff-lora-adapter/2"
    got = traverse_util.flatten_dict(loaded)
    assert set(got) == set(flat)
    for k, v in flat.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], np.asarray(v))
    other = init_params(model, jax.random.key(1))  # adapter.json binds it to its base
    with pytest.raises(CheckpointError, match="was trained on base .* not on this base"):
        load_adapter(tmp_path / "ad", base=other, model_cfg=_model_dict())


def test_partial_targets_are_written_as_full_module_names(base, tmp_path):
    _, params = base
    ad = _random_adapters(params, target_paths(params, [r"layers_\d+/attn/q", r"layers_1/mlp/up"]), 2)
    save_adapter(tmp_path / "ad", ad, {**_meta(params, 2, 2.0), "targets": ["..."]}, like=params)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.up_proj", "q_proj"]  # q: all layers; up: layer 1 only


# ------------------------------------------------------------------------------------------------
# import: a folder laid out by PEFT


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_folder_loads_and_its_logits_match_a_float64_reference(base, tmp_path, rslora):
    model, params = base
    tensors = _peft_tensors(_qv_modules(params), rank=4)
    d = _peft_folder(tmp_path / "peft", tensors, lora_alpha=8, use_rslora=rslora)
    adapters, meta = load_adapter(d, base=params, model_cfg=_model_dict())
    scale = 8 / 2.0 if rslora else 8 / 4  # PEFT: lora_alpha / sqrt(r) with use_rslora, else / r
    assert meta["scale"] == scale and meta["base_fingerprint"] is None
    assert sorted("/".join(p) for p in {k[:-1] for k in traverse_util.flatten_dict(adapters)}) == [
        "layers_0/attn/q",
        "layers_0/attn/v",
        "layers_1/attn/q",
        "layers_1/attn/v",
    ]
    ref_params = _reference_merged(params, tensors, scale)
    merged = merge(params, adapters, meta["scale"])
    for k, v in traverse_util.flatten_dict(ref_params).items():
        np.testing.assert_allclose(np.asarray(traverse_util.flatten_dict(merged)[k]), v, rtol=0, atol=2e-6)
    x = _tokens()
    ref = np.asarray(model.apply({"params": ref_params}, x).logits, np.float64)
    unmerged = np.asarray(apply_lora(model, params, adapters, meta["scale"], x).logits)
    merged_logits = np.asarray(model.apply({"params": merged}, x).logits)
    assert np.all(np.isfinite(unmerged)) and np.abs(ref - model.apply({"params": params}, x).logits).max() > 1e-3
    np.testing.assert_allclose(unmerged, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(merged_logits, ref, rtol=0, atol=2e-5)
    bank = AdapterSet(model, params, _model_dict())  # a foreign folder has no fingerprint to check
    bank.load("peft", d)
    np.testing.assert_array_equal(bank.apply("peft", x).logits, unmerged)


def test_peft_float16_and_bfloat16_tensors_load(base, tmp_path):
    _, params = base
    t32 = _peft_tensors(_qv_modules(params)[:1], rank=2)
    t16 = {k: v.astype(np.float16) for k, v in t32.items()}
    ad16, _ = load_adapter(_peft_folder(tmp_path / "f16", t16, r=2), base=params, model_cfg=_model_dict())
    a16 = ad16["layers_0"]["attn"]["q"]["a"]
    assert a16.dtype == np.float32  # widened exactly
    np.testing.assert_array_equal(a16, t16["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].astype(np.float32).T)
    tbf = {k: v.astype(ml_dtypes.bfloat16) for k, v in t32.items()}
    adbf, _ = load_adapter(_peft_folder(tmp_path / "bf16", tbf, r=2), base=params, model_cfg=_model_dict())
    assert adbf["layers_0"]["attn"]["q"]["b"].dtype == ml_dtypes.bfloat16


def _bad(tmp_path, params, name, mutate_tensors=None, **config):
    tensors = _peft_tensors(_qv_modules(params), rank=4)
    if mutate_tensors:
        tensors = mutate_tensors(tensors)
    return _peft_folder(tmp_path / name, tensors, **config)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "case,match",
    [
        ("no_weights", r"has no adapter_model.safetensors"),
        ("no_config", r"has neither adapter_config.json"),
        ("wrong_shape", rf"tensor {Q0}.lora_A.weight has shape \[4, 31\], expected \[4, 32\]"),
        ("r_mismatch", rf"tensor {Q0}.lora_A.weight has rank 3 .* says r=4"),
        (
            "unknown_module",
            r"tensor base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight: module "
            r"model.layers.0.self_attn.qkv_proj is not a Linear layer of this model",
        ),
        ("not_lora", r"tensor base_model.model.model.embed_tokens.weight is not a LoRA A/B weight"),
        ("half_pair", rf"tensor {Q0}.lora_B.weight is missing"),
        ("dora", r"use_dora=true is not supported"),
        ("layer_replication", r"layer_replication=\[\[0, 2\]\] is not supported"),
        ("rank_pattern", r"rank_pattern is not supported"),
        ("prefix", r"peft_type is 'PREFIX_TUNING'"),
    ],
)
def test_bad_peft_folders_fail_with_one_line_naming_the_file_and_tensor(base, tmp_path, case, match):
    _, params = base
    if case == "no_weights":
        d = _bad(tmp_path, params, case)
        (d / "adapter_model.safetensors").unlink()
    elif case == "no_config":
        d = _bad(tmp_path, params, case)
        (d / "adapter_config.json").unlink()
    elif case == "wrong_shape":
        d = _bad(tmp_path, params, case, lambda t: {**t, f"{Q0}.lora_A.weight": np.zeros((4, 31), np.float32)})
    elif case == "r_mismatch":
        d = _bad(tmp_path, params, case, lambda t: {**t, f"{Q0}.lora_A.weight": np.zeros((3, 32), np.float32)})
    elif case == "unknown_module":
        d = _bad(
            tmp_path, params, case, lambda t: {**t, "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": np.zeros((4, 32), np.float32)}
        )
    elif case == "not_lora":
        d = _bad(tmp_path, params, case, lambda t: {**t, "base_model.model.model.embed_tokens.weight": np.zeros((264, 32), np.float32)})
    elif case == "half_pair":
        d = _bad(tmp_path, params, case, lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_B.weight"})
    elif case == "dora":
        d = _bad(tmp_path, params, case, use_dora=True)
    elif case == "layer_replication":
        d = _bad(tmp_path, params, case, layer_replication=[[0, 2]])
    elif case == "rank_pattern":
        d = _bad(tmp_path, params, case, rank_pattern={"q_proj": 8})
    else:
        d = _bad(tmp_path, params, case, peft_type="PREFIX_TUNING")
    with pytest.raises(CheckpointError, match=match) as e:
        load_adapter(d, base=params, model_cfg=_model_dict())
    assert "\n" not in str(e.value)
    if case not in ("no_config",):
        assert str(d) in str(e.value)  # names the folder / file


# ------------------------------------------------------------------------------------------------
# runs: start a LoRA run from a PEFT folder; merge-adapter / export-adapter through the CLI


def test_lora_run_starts_from_a_peft_adapter(tiny_config, tmp_path):
    from jaxeff.train.loop import Trainer

    cfg = tiny_config(["method=lora"])
    params = init_params(Transformer(cfg.model), jax.random.key(0), (1, cfg.data.seq_len))
    tensors = _peft_tensors(_qv_modules(params), rank=4)
    d = _peft_folder(tmp_path / "peft", tensors, lora_alpha=8)
    run = tiny_config(["method=lora", "peft.rank=4", "peft.alpha=8", f"peft.init_adapter={d}"])
    state = Trainer(run, devices=jax.devices()[:1]).init_state(params)
    lora = traverse_util.flatten_dict(jax.device_get(state.params["lora"]))
    np.testing.assert_array_equal(lora[("layers_1", "attn", "v", "a")], tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].T)
    np.testing.assert_array_equal(lora[("layers_0", "attn", "q", "b")], tensors[f"{Q0}.lora_B.weight"].T)
    assert not np.any(lora[("layers_0", "mlp", "up", "b")])  # targets the folder lacks start as fresh adapters
    with pytest.raises(ConfigError, match=r"peft.rank: 8, but the adapter .* has rank \(r\) 4: set peft.rank=4"):
        Trainer(tiny_config(["method=lora", f"peft.init_adapter={d}"]))
    with pytest.raises(ConfigError, match=r"peft.alpha: 16 gives scale 4, .* scale 2: set peft.alpha=8"):
        Trainer(tiny_config(["method=lora", "peft.rank=4", "peft.alpha=16", f"peft.init_adapter={d}"]))
    with pytest.raises(ConfigError, match=r"peft.targets: .* adapts layers_0/attn/v, which no target matches"):
        Trainer(tiny_config(["method=lora", "peft.rank=4", "peft.alpha=8", f"peft.init_adapter={d}", r"peft.targets=[layers_\d+/attn/q]"]))


def _save_base_run(tiny_config, tmp_path):
    from jaxeff.train.checkpoint import open_new_run
    from jaxeff.train.loop import Trainer

    cfg = tiny_config(["name=base"])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state()
    ckpt = open_new_run(cfg, tmp_path / "runs" / "base")
    try:
        ckpt.save(0, state, data_state={}, config=cfg.to_dict())
    finally:
        ckpt.close()
    return cfg, jax.device_get(state.params)


def test_cli_merges_a_peft_folder_and_refuses_a_bad_one(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main
    from jaxeff.train.loop import load_params

    cfg, params = _save_base_run(tiny_config, tmp_path)
    tensors = _peft_tensors(_qv_modules(params), rank=4)
    good = _peft_folder(tmp_path / "peft", tensors, lora_alpha=8)
    out = tmp_path / "runs" / "merged"
    assert main(["merge-adapter", "--base", str(tmp_path / "runs" / "base"), "--adapter", str(good), "--out", str(out)]) == 0
    _, merged = load_params(tiny_config(["name=merged"]), out / "checkpoints")
    ref = _reference_merged(params, tensors, 2.0)
    for k, v in traverse_util.flatten_dict(ref).items():
        np.testing.assert_allclose(np.asarray(traverse_util.flatten_dict(jax.device_get(merged))[k]), v, rtol=0, atol=2e-6)
    bad = _peft_folder(tmp_path / "bad", {**tensors, f"{Q0}.lora_B.weight": np.zeros((32, 5), np.float32)})
    capsys.readouterr()
    assert main(["merge-adapter", "--base", str(tmp_path / "runs" / "base"), "--adapter", str(bad), "--out", str(tmp_path / "runs" / "merged2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{Q0}.lora_B.weight has rank 5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs" / "merged2").exists()


@pytest.mark.slow
def test_cli_exports_a_lora_run_as_peft_and_merges_it_back(tiny_config, tmp_path, capsys):
    from jaxeff.cli import main
    from jaxeff.train.loop import load_params, run_training

    _, params = _save_base_run(tiny_config, tmp_path)
    base_dir = str(tmp_path / "runs" / "base")
    run_training(
        tiny_config(
            [
                "name=ft",
                "method=lora",
                "train.steps=2",
                f"train.init_from={base_dir}",
                "peft.rank=4",
                "peft.alpha=8",
                r"peft.targets=[layers_\d+/attn/(q|v)]",
            ]
        )
    )
    ad = tmp_path / "ad"
    assert main(["export-adapter", "--checkpoint", str(tmp_path / "runs" / "ft"), "--out", str(ad), "--base-model", "exports/base_hf"]) == 0
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "exports/base_hf" and cfg["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(_peft_tensors(_qv_modules(params), 4))
    assert np.any(tensors[f"{Q0}.lora_B.weight"])  # trained
    # the same adapter without jaxeff's adapter.json (as PEFT would ship it) merges identically
    (ad / "adapter.json").rename(tmp_path / "adapter.json")
    assert main(["merge-adapter", "--base", base_dir, "--adapter", str(ad), "--out", str(tmp_path / "runs" / "m1")]) == 0
    (tmp_path / "adapter.json").rename(ad / "adapter.json")
    assert main(["merge-adapter", "--base", base_dir, "--adapter", str(ad), "--out", str(tmp_path / "runs" / "m2")]) == 0
    _, m1 = load_params(tiny_config(["name=m1"]), tmp_path / "runs" / "m1" / "checkpoints")
    _, m2 = load_params(tiny_config(["name=m2"]), tmp_path / "runs" / "m2" / "checkpoints")
    for k, v in traverse_util.flatten_dict(jax.device_get(m1)).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(jax.device_get(m2))[k], v)
    assert main(["export-adapter", "--checkpoint", str(tmp_path / "runs" / "ft"), "--out", str(ad)]) == 2
    assert "already holds an adapter" in capsys.readouterr().err


def test_cli_imports_a_peft_folder_as_a_lora_run_and_exports_it_back_identically(tiny_config, tmp_path, capsys):
    """PEFT folder -> import-adapter (a lora run, unmerged) -> export-adapter: the same tensors, bit for bit;
    the run's logits are the float64 reference's."""
    from jaxeff.cli import main
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import one_device_config
    from jaxeff.train.loop import load_params

    _, params = _save_base_run(tiny_config, tmp_path)
    tensors = _peft_tensors(_qv_modules(params), rank=4)
    src = _peft_folder(tmp_path / "peft", tensors, lora_alpha=16, use_rslora=True, lora_dropout=0.1)  # scale 8
    run = tmp_path / "runs" / "imported"
    assert main(["import-adapter", "--base", str(tmp_path / "runs" / "base"), "--adapter", str(src), "--out", str(run)]) == 0
    saved = read_config(run)
    assert saved["method"] == "lora" and saved["peft"]["rank"] == 4 and saved["peft"]["alpha"] == 32.0
    assert saved["peft"]["init_adapter"] is None and saved["peft"]["dropout"] == 0.1
    trainer, state_params = load_params(one_device_config(saved), run / "checkpoints", devices=jax.devices()[:1])
    x = _tokens()
    ref = np.asarray(Transformer(CFG).apply({"params": _reference_merged(params, tensors, 8.0)}, x).logits)
    np.testing.assert_allclose(np.asarray(trainer.method.run(trainer.model, state_params, x).logits), ref, rtol=0, atol=2e-5)
    out = tmp_path / "back"
    assert main(["export-adapter", "--checkpoint", str(run), "--out", str(out)]) == 0
    back = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (4, 32, 0.1, False)  # same scale
    capsys.readouterr()
    assert main(["import-adapter", "--base", str(run), "--adapter", str(src), "--out", str(tmp_path / "r2")]) == 2
    assert "expected a plain lm run" in capsys.readouterr().err
