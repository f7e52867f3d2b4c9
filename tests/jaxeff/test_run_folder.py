"""A run folder describes itself: eval / generate from the run's own config, truthful config.yaml
of the folders commands write (convert, quantize), tokenizer.json + generation_config.json on export,
``train.init_from=hf:DIR`` reading config.json."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import pytest
import yaml

from jaxeff.cli import main
from jaxeff.config import from_dict, load_config, resolve_raw
from tests.conftest import TINY

# a run whose data settings differ from the schema defaults (the defaults select other eval docs)
DATA = {"domains": ["arithmetic", "prose"], "docs_per_domain": 40, "eval_docs_per_domain": 4, "seq_len": 32, "batch_size": 8, "doc_len": 200}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jaxeff.train.loop import run_training

    root = tmp_path_factory.mktemp("runfolder")
    raw = copy.deepcopy(TINY)
    raw["data"] = dict(DATA)
    raw["train"] = {**raw["train"], "steps": 2, "eval_every": 2}
    raw["checkpoint"] = {"every": 2, "keep": 1}
    raw["logging"]["run_dir"] = str(root / "runs")
    cfg = from_dict(raw)
    run_training(cfg, devices=jax.devices()[:1])
    yaml_path = root / "tiny.yaml"
    yaml_path.write_text(cfg.to_yaml())
    return root, cfg, yaml_path


def _losses(out: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in out.strip().splitlines()}


def test_eval_from_the_run_config_alone(trained, capsys):
    root, cfg, yaml_path = trained
    assert main(["eval", "--checkpoint", str(cfg.run_path)]) == 0
    own = _losses(capsys.readouterr().out)
    assert main(["eval", str(yaml_path), "--checkpoint", str(cfg.run_path)]) == 0  # the old form
    assert _losses(capsys.readouterr().out) == own
    assert set(own) == {"eval/loss/arithmetic", "eval/loss/prose", "eval/loss", "eval/perplexity"}
    # a YAML (or overrides) replace the data/eval settings only; the model stays the run's
    other = root / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"d_model": 999}, "data": {**DATA, "domains": ["prose"]}}))
    assert main(["eval", str(other), "--checkpoint", str(cfg.run_path)]) == 0
    assert set(_losses(capsys.readouterr().out)) == {"eval/loss/prose", "eval/loss", "eval/perplexity"}
    assert main(["eval", "--checkpoint", str(cfg.run_path), "data.domains=[arithmetic]"]) == 0
    assert _losses(capsys.readouterr().out)["eval/loss"] == pytest.approx(own["eval/loss/arithmetic"], abs=1e-4)


def test_convert_round_trip_is_truthful_and_evaluates_the_same(trained, capsys):
    import tokenizers

    root, cfg, _ = trained
    hf, back = root / "hf", root / "runs" / "back"
    assert main(["convert", "--from", str(cfg.run_path), "--to-hf", str(hf)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "jaxeff_run.yaml"} <= {p.name for p in hf.iterdir()}
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (257, 258, 256)
    # the byte tokenizer as a tokenizers file: same ids as jaxeff's, decoded back
    tok = tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json"))
    text = "héllo\tworld\n x=1; \x00\x7f 🙂 {ü}"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [256, 257, 258]
    capsys.readouterr()

    assert main(["convert", "--from-hf", str(hf), "--out", str(back)]) == 0
    written = yaml.safe_load((back / "config.yaml").read_text())
    prov = written["provenance"]
    assert prov["command"] == "jaxeff convert --from-hf" and prov["method"] == "lm" and prov["step"] == 2
    assert written["data"]["docs_per_domain"] == 40 and written["data"]["doc_len"] == 200  # not the defaults
    assert written["data"]["tokenizer"] == "byte" and written["train"]["eval_batches"] == 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(cfg.run_path)]) == 0
    source = _losses(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(back)]) == 0
    assert _losses(capsys.readouterr().out) == pytest.approx(source, abs=1e-4)
    assert main(["generate", "--checkpoint", str(back), "--prompt", "1+", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("1+")


def test_convert_without_a_record_says_its_data_is_unknown(trained, capsys):
    root, cfg, yaml_path = trained
    hf = root / "hf_bare"
    assert main(["convert", "--from", str(cfg.run_path), "--to-hf", str(hf)]) == 0
    (hf / "jaxeff_run.yaml").unlink()  # as a model from elsewhere
    run = root / "runs" / "bare"
    assert main(["convert", "--from-hf", str(hf), "--out", str(run)]) == 0
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["provenance"]["data"] == "unknown" and written["optim"]["name"] == "adamw"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no data" in err
    assert main(["eval", str(yaml_path), "--checkpoint", str(run)]) == 0
    assert "eval/loss" in capsys.readouterr().out
    # the written config.yaml loads as a config (the provenance mapping is set aside)
    assert load_config(run / "config.yaml").name == "bare"


def test_init_from_hf_reads_the_model_section(trained, tmp_path):
    root, cfg, _ = trained
    hf = root / "hf_init"
    assert main(["convert", "--from", str(cfg.run_path), "--to-hf", str(hf)]) == 0
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "ft", "data": DATA, "train": {"init_from": f"hf:{hf}"}, "model": {"attention_impl": "xla"}}))
    loaded = load_config(cfg_file)
    assert (loaded.model.d_model, loaded.model.n_layers, loaded.model.n_kv_heads) == (32, 2, 2)
    assert loaded.model.attention_impl == "xla"  # keys the config gives win
    raw = resolve_raw(None, [f"train.init_from=hf:{tmp_path}"])  # no config.json: refused when training starts
    assert "model" not in raw


def test_quantize_writes_a_run_folder_with_its_provenance(trained, capsys):
    root, cfg, _ = trained
    out = root / "runs" / "int8"
    assert main(["quantize", "--checkpoint", str(cfg.run_path), "--out", str(out), "quant.convert.backend=reference"]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["method"] == "quantized" and written["name"] == "int8"
    assert written["provenance"]["command"] == "jaxeff quantize" and written["provenance"]["format"] == "int8"
    assert written["data"]["doc_len"] == 200
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert "eval/loss" in capsys.readouterr().out
    assert main(["quantize", "--checkpoint", str(cfg.run_path), "--out", str(out)]) == 2  # already there
    assert "already holds a checkpoint" in capsys.readouterr().err
    shutil.rmtree(out)


def test_distill_topk_verb_shows_progress(trained, capfd):
    import numpy as np

    root, cfg, yaml_path = trained
    out = root / "top4.npz"
    assert (
        main(
            [
                "distill-topk",
                str(yaml_path),
                "method=distill",
                f"distill.teacher_checkpoint={cfg.run_path}",
                "logging.progress=true",
                "--k",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capfd.readouterr()
    assert "teacher top-4" in captured.err and "row" in captured.err and f"wrote {out}" in captured.out
    with np.load(out) as f:
        assert f["topk_ids"].shape[-1] == 4 and np.isfinite(f["topk_logits"]).all()
    assert (
        main(["distill-topk", str(yaml_path), "method=distill", f"distill.teacher_checkpoint={cfg.run_path}", "--k", "0", "--out", str(root / "bad.npz")])
        == 2
    )
    assert capfd.readouterr().err.startswith("error: k: expected 1..")


def test_a_sparsified_run_says_what_made_it_and_evaluates_from_its_own_config(trained, capsys):
    from jaxeff.prune.wanda import sparsify_run

    root, cfg, _ = trained
    out = root / "runs" / "sparse"
    sparsify_run(cfg.run_path, out, method="magnitude", sparsity=0.5, evaluate=False)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["provenance"]["command"] == "jaxeff sparsify"
    assert written["provenance"]["source"] == str(cfg.run_path.absolute())
    assert written["method"] == "lm" and written["data"] == cfg.to_dict()["data"]
    assert main(["eval", "--checkpoint", str(out)]) == 0  # parameters only, no optimizer state
    assert set(_losses(capsys.readouterr().out)) == {"eval/loss/arithmetic", "eval/loss/prose", "eval/loss", "eval/perplexity"}
    assert (
        main(["train", str(root / "tiny.yaml"), f"logging.run_dir={root / 'runs'}", "name=sparse", "resume=true"]) == 2
    )  # a parameters-only run is not resumable: refused, one line
    assert "holds parameters only (written by jaxeff sparsify)" in capsys.readouterr().err
