"""Named eval metrics (``jaxeff eval --metric NAME``): what each one measures (checked against oracle
and wrong decoders, and a real run), the registry, and bad input as one line before anything loads."""

import copy

import jax
import pytest

from jaxeff import evals
from jaxeff.cli import main
from jaxeff.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny lm run at its random initialisation (no training needed to exercise the metrics)."""
    from conftest import TINY

    from jaxeff.config import from_dict
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.loop import Trainer

    raw = copy.deepcopy(TINY)
    raw["logging"]["run_dir"] = str(tmp_path_factory.mktemp("evals") / "runs")
    cfg = from_dict(raw)
    with Checkpointer(cfg.checkpoint_path) as ckpt:
        ckpt.save(0, Trainer(cfg, devices=jax.devices()[:1]).init_state(), data_state={}, config=cfg.to_dict())
    return cfg


def _ctx(cfg, decode, **options):
    """A context whose greedy decoder is ``decode(prompts, new_tokens) -> token lists`` (an oracle or a
    wrong model), with the run's tokenizer and eval data."""
    from jaxeff.train.inputs import build_data

    _, _, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    opts = dict(options)
    ctx = evals.EvalContext(
        cfg=cfg,
        run=cfg.checkpoint_path,
        step=None,
        model=None,
        params=None,
        apply=None,
        method=None,
        tokenizer=load_tokenizer(cfg.data.tokenizer),
        eval_sets=eval_sets,
        options=opts,
    )
    ctx.greedy = decode
    return ctx


def test_arithmetic_problems_are_fresh_and_their_answers_are_right(run):
    tok = load_tokenizer("byte")
    problems = evals.arithmetic_prompts(run, tok, 50, seed=0, context=32)
    assert len(problems) == 50
    for prompt, answer in problems:
        text = tok.decode(prompt)
        assert len(prompt) == 32 and text.endswith("=")
        expr = text.split("\n")[-1][:-1]
        assert str(eval(expr)) == answer, (expr, answer)  # the generator's lines: + - * and parentheses only
    again = evals.arithmetic_prompts(run, tok, 50, seed=0, context=32)
    other = evals.arithmetic_prompts(run, tok, 50, seed=1, context=32)
    assert again == problems and other != problems
    # not the run's training or eval documents
    from jaxeff.data.synthetic import generate_documents
    from jaxeff.train.inputs import EVAL_SEED_OFFSET

    seen = "".join(
        generate_documents("arithmetic", run.data.docs_per_domain, run.data.seed)
        + generate_documents("arithmetic", run.data.eval_docs_per_domain, run.data.seed + EVAL_SEED_OFFSET)
    )
    assert sum(tok.decode(p) in seen for p, _ in problems) < 5


def test_arithmetic_accuracy_counts_exact_answers(run):
    tok = load_tokenizer("byte")
    problems = dict((tuple(p), a) for p, a in evals.arithmetic_prompts(run, tok, 40, seed=3, context=32))

    def oracle(prompts, new):  # the right answer, then a newline and junk
        return [(tok.encode(problems[tuple(p)] + "\n7777777777"))[:new] for p in prompts]

    def off_by_one_on_half(prompts, new):
        out = []
        for i, p in enumerate(prompts):
            a = problems[tuple(p)]
            out.append(tok.encode((a if i % 2 else str(int(a) + 1)) + "\n")[:new])
        return out

    def no_stop(prompts, new):  # the right digits followed by more digits is a wrong answer
        return [tok.encode(problems[tuple(p)] + "0")[:new] for p in prompts]

    opts = dict(examples=40, seed=3, context=32, new_tokens=12)
    assert evals.arithmetic_accuracy(_ctx(run, oracle, **opts)) == {"arithmetic_accuracy": 1.0, "arithmetic_problems": 40}
    assert evals.arithmetic_accuracy(_ctx(run, off_by_one_on_half, **opts))["arithmetic_accuracy"] == 0.5
    assert evals.arithmetic_accuracy(_ctx(run, no_stop, **opts))["arithmetic_accuracy"] == 0.0


def test_greedy_ref_match_compares_with_the_eval_datas_own_continuation(run):
    opts = dict(examples=30, seed=0, prompt_tokens=8, new_tokens=6)
    windows = evals.reference_windows(_ctx(run, None).eval_sets, 30, 8, 6, 0)
    refs = {tuple(p): r for p, r in windows}
    assert all(len(p) == 8 and len(r) == 6 for p, r in windows)

    def oracle(prompts, new):
        return [refs[tuple(p)] for p in prompts]

    def half_right(prompts, new):  # right for the first 3 tokens, then wrong
        return [refs[tuple(p)][:3] + [(t + 1) % 256 for t in refs[tuple(p)][3:]] for p in prompts]

    assert evals.greedy_ref_match(_ctx(run, oracle, **opts)) == {"greedy_ref_match": 1.0, "greedy_ref_prefix": 1.0}
    got = evals.greedy_ref_match(_ctx(run, half_right, **opts))
    assert got["greedy_ref_match"] == pytest.approx(0.5) and got["greedy_ref_prefix"] == pytest.approx(0.5)


def test_windows_stay_inside_one_document(run):
    import numpy as np

    ctx = _ctx(run, None)
    eos = ctx.tokenizer.eos_id
    for prompt, ref in evals.reference_windows(ctx.eval_sets, 200, 8, 8, 1):
        assert eos not in prompt + ref[:-1]
    assert np.all(np.asarray([len(p) for p, _ in evals.reference_windows(ctx.eval_sets, 5, 8, 8, 1)]) == 8)


def test_cli_prints_metrics_after_the_losses_and_a_run_matches_itself(run, capsys):
    code = main(
        [
            "eval",
            "--checkpoint",
            str(run.run_path),
            "--metric",
            "arithmetic_accuracy",
            "--metric",
            "teacher_match",
            "--teacher",
            str(run.run_path),
            "--examples",
            "8",
            "--metric-arg",
            "new_tokens=6",
            "--metric-arg",
            "prompt_tokens=16",
        ]
    )
    lines = capsys.readouterr().out.split("\n")
    assert code == 0
    keys = [ln.split()[0] for ln in lines if ln.strip()]
    assert keys.index("eval/loss") < keys.index("arithmetic_accuracy") < keys.index("teacher_match")
    values = {ln.split()[0]: ln.split()[1] for ln in lines if ln.strip()}
    assert values["arithmetic_problems"] == "8"
    assert 0.0 <= float(values["arithmetic_accuracy"]) <= 1.0
    assert float(values["teacher_match"]) == 1.0  # greedy decoding is deterministic: a run agrees with itself
    code = main(
        [
            "eval",
            "--checkpoint",
            str(run.run_path),
            "--metric",
            "greedy_ref_match",
            "--examples",
            "4",
            "--no-losses",
            "--metric-arg",
            "prompt_tokens=8",
            "--metric-arg",
            "new_tokens=8",
        ]
    )
    keys = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert code == 0 and keys == ["greedy_ref_match", "greedy_ref_prefix"]


def test_evaluate_run_is_what_the_cli_prints(run):
    got = evals.evaluate_run(run.run_path, ["arithmetic_accuracy"], losses=False, examples=8, new_tokens=6)
    assert set(got) == {"arithmetic_accuracy", "arithmetic_problems"} and got["arithmetic_problems"] == 8


def test_a_registered_metric_is_listed_and_run(run, capsys):
    @evals.register_metric("eval_rows", options={"scale": evals.Option(float, 1.0, "multiplier")})
    def eval_rows(ctx):
        """rows of eval data"""
        return {"eval_rows": ctx.options["scale"] * sum(int(a["inputs"].shape[0]) for a in ctx.eval_sets.values())}

    try:
        assert "eval_rows" in evals.metric_names()
        assert main(["eval", "--checkpoint", str(run.run_path), "--metric", "eval_rows", "--metric-arg", "scale=2", "--no-losses"]) == 0
        line = capsys.readouterr().out.strip()
        assert line.split()[0] == "eval_rows" and float(line.split()[1]) > 0 and float(line.split()[1]) % 2 == 0
    finally:
        evals._METRICS.pop("eval_rows")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--metric", "accuracy"], "unknown metric 'accuracy' (known: "),
        (["--metric", "arithmetic_accuracy", "--metric-arg", "prompt_tokens=3"], "'prompt_tokens' is not an option"),
        (["--metric", "arithmetic_accuracy", "--metric-arg", "context"], "expected key=value"),
        (["--metric", "arithmetic_accuracy", "--metric-arg", "context=many"], "context: expected int"),
        (["--metric", "greedy_ref_match", "--examples", "0"], "--examples: expected a positive number"),
        (["--metric", "greedy_ref_match", "--teacher", "runs/t"], "'teacher' is not an option of greedy_ref_match"),
        (["--no-losses"], "nothing to print"),
        (["--metric", "greedy_ref_match", "--metric-arg", "new_tokens=0"], "new_tokens: expected a positive number"),
    ],
)
def test_bad_metric_input_is_one_line_before_anything_loads(tmp_path, capsys, argv, expected):
    # the checkpoint does not exist: the metric error must come first
    code = main(["eval", "--checkpoint", str(tmp_path / "runs" / "nope"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    if "unknown metric" in expected:
        assert all(name in err[0] for name in ("arithmetic_accuracy", "greedy_ref_match", "teacher_match"))


def test_teacher_match_needs_a_teacher(run, capsys):
    code = main(["eval", "--checkpoint", str(run.run_path), "--metric", "teacher_match", "--no-losses"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--teacher: teacher_match needs" in err[0]


def test_windows_longer_than_a_row_are_refused_in_one_line(run, capsys):
    code = main(["eval", "--checkpoint", str(run.run_path), "--metric", "greedy_ref_match", "--no-losses"])  # 16 + 24 > 32
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "do not fit in one eval row of data.seq_len=32" in err[0], err
