"""Distilling step-by-step (method ``step_by_step``, ``jaxeff distill-rationales``): the generator's carry
steps, the data files, which tokens each task's loss counts, the λ weighting, teacher rationales, the
label-task accuracy metric, and bad input."""

import copy
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxeff import evals
from jaxeff.cli import main
from jaxeff.data.packing import pack_texts
from jaxeff.data.synthetic import arithmetic_additions, carry_steps, generate_documents
from jaxeff.data.tokenizer import load_tokenizer
from jaxeff.distill.step_by_step import StepByStepConfig, task_ids, task_masks

TOK = load_tokenizer("byte")


def _answer_from_steps(steps: str) -> int:
    sums = [s.split("=")[1] for s in steps.split(",")]
    return int(sums[-1] + "".join(s[-1] for s in reversed(sums[:-1])))


def test_carry_steps_spell_out_the_sum():
    assert carry_steps(27, 58) == "7+8+0=15,2+5+1=8"
    assert carry_steps(95, 17) == "5+7+0=12,9+1+1=11"
    assert carry_steps(5, 123) == "5+3+0=8,0+2+0=2,0+1+0=1"
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(10 ** rng.randint(1, 6))
        assert _answer_from_steps(carry_steps(a, b)) == a + b, (a, b)


def test_additions_are_deterministic_prefix_stable_and_leave_the_arithmetic_domain_alone():
    probs = arithmetic_additions(50, 7, digits=3)
    assert probs == arithmetic_additions(50, 7, digits=3) and probs[:20] == arithmetic_additions(20, 7, digits=3)
    assert probs != arithmetic_additions(50, 8, digits=3)
    for p in probs:
        a, b = map(int, p["question"].split("+"))
        assert str(a + b) == p["answer"] and p["rationale"] == carry_steps(a, b) and a < 1000 and b < 1000
    assert max(len(p["question"].split("+")[0]) for p in arithmetic_additions(400, 0, digits=4)) == 4
    # the arithmetic domain's documents are what they were (the new generator draws from its own streams)
    docs = generate_documents("arithmetic", 3, 0, doc_len=80)
    assert docs == generate_documents("arithmetic", 3, 0, doc_len=80) and all("[" not in d for d in docs)


def _reference_masks(texts, seq_len, section):
    """Per packed row: which targets are label / rationale outputs, by walking the documents in Python."""
    label_rows, rat_rows = [], []
    stream = []  # (token, doc index, offset in doc)
    for d, text in enumerate(texts):
        ids = [TOK.bos_id] + TOK.encode(text) + [TOK.eos_id]
        stream += [(t, d, k) for k, t in enumerate(ids)]
    for r in range(0, len(stream), seq_len):
        row = stream[r : r + seq_len]
        lab, rat = np.zeros(seq_len), np.zeros(seq_len)
        starts = {}
        for i, (t, d, k) in enumerate(row):
            starts.setdefault(d, k)
            text = texts[d]
            if starts[d] != 0 or t == TOK.eos_id:  # a piece without its start, or no next token
                continue
            if k < 1 + text.index(section.answer_marker):  # before the marker
                continue
            if text.startswith(section.label_prefix):
                lab[i] = 1
            elif text.startswith(section.rationale_prefix):
                rat[i] = 1
        label_rows.append(lab)
        rat_rows.append(rat)
    return np.asarray(label_rows), np.asarray(rat_rows)


@pytest.mark.parametrize("seq_len", [24, 37, 64])
def test_task_masks_count_each_tasks_output_tokens_of_documents_that_start_in_the_row(seq_len):
    s = StepByStepConfig()
    texts = []
    for p in arithmetic_additions(30, 1):
        texts.append(f"{s.label_prefix}{p['question']}={p['answer']}")
        texts.append(f"{s.rationale_prefix}{p['question']}={p['rationale']}")
    texts.insert(5, "no prefix here 1+2=3")  # a document of neither task
    packed = pack_texts(texts, TOK, seq_len)
    lab_ids, rat_ids, marker = task_ids(s, TOK)
    lab, rat = task_masks(
        jnp.asarray(packed["inputs"]),
        jnp.asarray(packed["positions"]),
        jnp.asarray(packed["loss_mask"]),
        bos_id=TOK.bos_id,
        marker_id=marker,
        prefixes=(lab_ids, rat_ids),
    )
    want_lab, want_rat = _reference_masks(texts, seq_len, s)
    np.testing.assert_array_equal(np.asarray(lab), want_lab[: lab.shape[0]])
    np.testing.assert_array_equal(np.asarray(rat), want_rat[: rat.shape[0]])
    assert want_lab.sum() > 0 and want_rat.sum() > 0
    # the first label output target is the answer's first digit
    row, col = np.argwhere(np.asarray(lab))[0]
    assert chr(int(packed["inputs"][row, col])) == "=" and chr(int(packed["targets"][row, col])).isdigit()


@pytest.fixture()
def sbs_config(tmp_path, tiny_config):
    def make(*overrides):
        data = tmp_path / "data"
        return tiny_config(
            [
                "method=step_by_step",
                "data.source=files",
                f"data.paths=[{data / 'train.jsonl'}]",
                f"data.eval_paths=[{data / 'eval.jsonl'}]",
                "step_by_step.problems=40",
                "step_by_step.eval_problems=8",
                "data.seq_len=48",
                *overrides,
            ]
        )

    return make


def test_the_loss_is_label_ce_plus_lambda_rationale_ce(sbs_config):
    from jaxeff.distill.step_by_step import step_by_step_method, write_data
    from jaxeff.models import Transformer, init_params
    from jaxeff.train.inputs import build_data

    cfg = sbs_config("step_by_step.rationale_weight=0.25")
    write_data(cfg)
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    batch = {k: jnp.asarray(v) for k, v in loader.next_batch().items() if k != "domain_ids"}
    model = Transformer(cfg.model)
    params = init_params(model, jax.random.PRNGKey(0))
    loss = jax.jit(lambda p, b: step_by_step_method(cfg, model).loss(p, b, jax.random.PRNGKey(0), frozen=None, deterministic=True))
    value, m = loss(params, batch)
    assert m["label_tokens"] > 0 and m["rationale_tokens"] > 0
    assert float(value) == pytest.approx(float(m["label_ce"]) + 0.25 * float(m["rationale_ce"]), rel=1e-5)
    # the label CE by hand: -log p(target) over the label mask
    out = model.apply({"params": params}, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], deterministic=True)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    lab_ids, rat_ids, marker = task_ids(cfg.step_by_step, TOK)
    lab, rat = task_masks(batch["inputs"], batch["positions"], batch["loss_mask"], bos_id=TOK.bos_id, marker_id=marker, prefixes=(lab_ids, rat_ids))
    lab = np.asarray(lab)
    assert float(m["label_ce"]) == pytest.approx((nll * lab).sum() / lab.sum(), rel=1e-5)
    # λ = 0: the rationale tokens get no gradient (changing their targets changes nothing); λ > 0: they do
    changed = dict(batch, targets=jnp.where(rat > 0, (batch["targets"] + 1) % 256, batch["targets"]))
    for weight, same in ((0.0, True), (0.25, False)):
        method = step_by_step_method(sbs_config(f"step_by_step.rationale_weight={weight}"), model)
        g = jax.jit(jax.grad(lambda p, b: method.loss(p, b, jax.random.PRNGKey(0), frozen=None, deterministic=True)[0]))
        a, b = jax.tree.leaves(g(params, batch)), jax.tree.leaves(g(params, changed))
        assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b)) == same


def test_distill_rationales_writes_both_tasks_or_labels_only(sbs_config, capsys):
    cfg = sbs_config()
    path = cfg.data.paths[0]
    cfg_file = _write_yaml(cfg)
    assert main(["distill-rationales", str(cfg_file)]) == 0
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 80 and [r["task"] for r in recs[:4]] == ["label", "rationale", "label", "rationale"]
    q = recs[1]["text"].removeprefix("[rationale] ").split("=", 1)
    a, b = map(int, q[0].split("+"))
    assert q[1] == carry_steps(a, b) and recs[0]["text"] == f"[label] {a}+{b}={a + b}"
    evals_ = [json.loads(line) for line in open(cfg.data.eval_paths[0])]
    assert len(evals_) == 16 and not {r["text"] for r in evals_} & {r["text"] for r in recs}
    # existing files are refused without --force; labels only with rationale_source=none
    capsys.readouterr()
    assert main(["distill-rationales", str(cfg_file), "step_by_step.rationale_source=none"]) == 2
    assert "already exists (--force to overwrite)" in capsys.readouterr().err
    assert main(["distill-rationales", str(cfg_file), "step_by_step.rationale_source=none", "--force"]) == 0
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 40 and {r["task"] for r in recs} == {"label"}


def _write_yaml(cfg):
    import pathlib

    p = pathlib.Path(cfg.data.paths[0]).parent.parent / "sbs.yaml"
    raw = cfg.to_dict()
    p.write_text(yaml.safe_dump(raw))
    return p


def test_teacher_rationales_are_the_teachers_greedy_continuations(sbs_config, tmp_path):
    from jaxeff.config import from_dict
    from jaxeff.distill.step_by_step import write_data
    from jaxeff.models import Transformer
    from jaxeff.runs import load_model_params
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    raw = copy.deepcopy(sbs_config().to_dict())
    raw["name"], raw["method"] = "teacher", "lm"
    teacher = from_dict(raw)
    with Checkpointer(teacher.checkpoint_path) as ckpt:  # a teacher at its random initialisation
        ckpt.save(0, Trainer(teacher, devices=jax.devices()[:1]).init_state(), data_state={}, config=teacher.to_dict())
    cfg = sbs_config(
        "step_by_step.rationale_source=teacher",
        f"step_by_step.teacher_checkpoint={teacher.run_path}",
        "step_by_step.max_rationale_tokens=6",
        "step_by_step.problems=5",
    )
    rec = write_data(cfg)
    assert 0.0 <= rec["teacher_rationales_exact"] <= 1.0
    recs = [json.loads(line) for line in open(cfg.data.paths[0])]
    t_cfg, params = load_model_params(teacher.run_path)
    p = arithmetic_additions(5, cfg.data.seed, digits=3)[2]
    prompt = [TOK.bos_id] + TOK.encode(f"[rationale] {p['question']}=")
    new = evals.greedy_tokens(Transformer(t_cfg.model), params, [prompt], 6)[0]
    assert recs[5]["text"] == f"[rationale] {p['question']}=" + TOK.decode(evals.until(new, {TOK.eos_id, 10}))


def test_accuracy_of_a_step_by_step_run_asks_the_label_task(sbs_config):
    cfg = sbs_config()
    problems = evals.arithmetic_prompts(cfg, TOK, 20, seed=0, context=32)
    assert all(TOK.decode(p[1:]).startswith("[label] ") and p[0] == TOK.bos_id for p, _ in problems)
    answers = {tuple(p): a for p, a in problems}
    ctx = evals.EvalContext(
        cfg=cfg,
        run=None,
        step=None,
        model=None,
        params=None,
        apply=None,
        method=None,
        tokenizer=TOK,
        eval_sets={},
        options=dict(examples=20, seed=0, context=32, new_tokens=8),
    )
    ctx.greedy = lambda prompts, new: [TOK.encode(answers[tuple(p)])[:new] + [TOK.eos_id] for p in prompts]
    assert evals.arithmetic_accuracy(ctx)["arithmetic_accuracy"] == 1.0
    for p, a in problems:
        x, y = TOK.decode(p[1:]).removeprefix("[label] ").rstrip("=").split("+")
        assert int(x) + int(y) == int(a)


@pytest.mark.slow
def test_a_run_trains_and_is_evaluated_end_to_end(sbs_config, capsys):
    cfg = sbs_config("train.steps=2", "train.eval_every=2", "checkpoint.every=2")
    cfg_file = _write_yaml(cfg)
    assert main(["distill-rationales", str(cfg_file)]) == 0
    assert main(["train", str(cfg_file)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(cfg.run_path), "--metric", "arithmetic_accuracy", "--examples", "4", "--metric-arg", "new_tokens=4"]) == 0
    out = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert "eval/loss/files" in out and out["arithmetic_problems"] == "4"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["step_by_step.label_prefix=<r>", "step_by_step.rationale_prefix='<r> x'"], "neither may start the other"),
        (["step_by_step.answer_marker=]"], "answer_marker"),
        (["step_by_step.rationale_source=teacher"], "teacher_checkpoint: rationale_source=teacher needs"),
        (["step_by_step.rationale_weight=-1"], "step_by_step.rationale_weight"),
    ],
)
def test_bad_settings_are_one_line(sbs_config, overrides, expected):
    from jaxeff.errors import ConfigError

    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        sbs_config(*overrides)


def test_distill_rationales_refuses_data_it_cannot_write(sbs_config, capsys):
    cfg_file = _write_yaml(sbs_config())
    for extra, expected in (
        (["data.source=synthetic"], "data.source: step_by_step trains on the files"),
        (["data.eval_paths=[]"], "data.eval_paths: distill-rationales writes one .jsonl"),
        (["method=lm"], "method: distill-rationales writes the data of a step_by_step run"),
    ):
        assert main(["distill-rationales", str(cfg_file), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
