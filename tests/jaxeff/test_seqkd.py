"""Sequence-level distillation data (``jaxeff distill-generate``): the file the data loader reads, the
teacher's continuations, determinism with a seed, and bad input."""

import json

import jax
import numpy as np
import pytest

from jaxeff.cli import main
from jaxeff.data.files import load_text_documents
from jaxeff.distill.seqkd import generate_dataset


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import copy

    from conftest import TINY

    from jaxeff.config import from_dict
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    raw = copy.deepcopy(TINY)
    raw["name"] = "teacher"
    raw["logging"]["run_dir"] = str(tmp_path_factory.mktemp("seqkd") / "runs")
    cfg = from_dict(raw)
    with Checkpointer(cfg.checkpoint_path) as ckpt:  # a teacher at its random initialisation (no training needed)
        ckpt.save(0, Trainer(cfg, devices=jax.devices()[:1]).init_state(), data_state={}, config=cfg.to_dict())
    return cfg


def test_generated_file_is_read_by_the_data_loader_and_holds_the_teachers_greedy_continuations(teacher, tmp_path):
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.models import Transformer
    from jaxeff.models.generate import generate
    from jaxeff.runs import load_model_params
    from jaxeff.train.inputs import build_data

    out = tmp_path / "seqkd.jsonl"
    rec = generate_dataset(teacher.run_path, out, num=5, prompt_tokens=8, max_new_tokens=10, batch_size=4)
    assert rec["samples"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    docs = load_text_documents([str(out)])
    assert docs == [r["text"] for r in rows if r["text"]] and len(rows) == 5
    assert {r["domain"] for r in rows} <= {"arithmetic", "prose"}
    # the continuation is the teacher's greedy one
    cfg, params = load_model_params(teacher.run_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    r = rows[0]
    ids = tok.encode(r["prompt"])
    prompt = np.asarray([ids if len(ids) == 8 else [tok.bos_id] + ids], np.int32)
    new = [int(t) for t in np.asarray(generate(Transformer(cfg.model), params, prompt, jax.random.PRNGKey(0), max_new_tokens=10))[0]]
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert r["text"] == r["prompt"] + tok.decode(new)
    # a plain lm run reads it through data.paths
    from jaxeff.config import from_dict

    student = teacher.to_dict()
    student["data"].update(source="files", paths=[str(out)], eval_fraction=0.2)
    s_cfg = from_dict(student)
    _, loader, evals = build_data(s_cfg.data, s_cfg.model.vocab_size)
    batch = loader.next_batch()
    assert batch["inputs"].shape == (s_cfg.data.batch_size, s_cfg.data.seq_len) and "files" in evals


def test_generation_is_deterministic_with_a_seed(teacher, tmp_path):
    kw = dict(num=6, prompt_tokens=8, max_new_tokens=8, temperature=1.0, batch_size=4)
    generate_dataset(teacher.run_path, tmp_path / "a.jsonl", seed=3, **kw)
    generate_dataset(teacher.run_path, tmp_path / "b.jsonl", seed=3, **kw)
    generate_dataset(teacher.run_path, tmp_path / "c.jsonl", seed=4, **kw)
    a, b, c = ((tmp_path / f"{n}.jsonl").read_text() for n in "abc")
    assert a == b and a != c


def test_prompts_file_and_parquet_output(teacher, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12+7=\nid: 5\n\nthe cat\n")
    out = tmp_path / "seqkd.parquet"
    rc = main(["distill-generate", str(teacher.run_path), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "6"])
    assert rc == 0 and "3 samples" in capsys.readouterr().out
    docs = load_text_documents([str(out)])
    assert [d[:5] for d in docs] == ["12+7=", "id: 5", "the c"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--out", "{tmp}/x.csv"], "--out: expected a .jsonl or .parquet"),
        (["--out", "{tmp}/x.jsonl", "--num", "0"], "--num: expected a positive integer"),
        (["--out", "{tmp}/x.jsonl", "--temperature", "-1"], "--temperature"),
        (["--out", "{tmp}/x.jsonl", "--seed", str(2**70)], "--seed"),
        (["--out", "{tmp}/x.jsonl", "--max-new-tokens", "200"], "exceed the teacher's max_seq_len=64"),
        (["--out", "{tmp}/x.jsonl", "--prompts", "{tmp}/none.txt"], "--prompts: file"),
        (["--out", "{tmp}/exists.jsonl"], "already exists"),
    ],
)
def test_distill_generate_bad_input_exits_2_with_one_line(teacher, tmp_path, capsys, argv, msg):
    (tmp_path / "exists.jsonl").write_text("{}\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["distill-generate", str(teacher.run_path), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_distill_generate_missing_teacher_exits_2(tmp_path, capsys):
    rc = main(["distill-generate", str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1
