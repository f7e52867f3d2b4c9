"""Method ``step_by_step``: distilling step-by-step (Hsieh et al., 2023) -- multi-task training on rationales.

The same input is given with two task prefixes: ``[label] 27+58=`` is trained to predict the answer
(``85``) and ``[rationale] 27+58=`` the rationale (here the carry steps ``7+8+0=15,2+5+1=8``)::

    loss = L_label + λ · L_rationale          λ = step_by_step.rationale_weight

each term the mean cross-entropy over its task's *output* tokens (those after the first
``answer_marker`` of the line, the end of the document included), as in the paper's seq2seq
outputs; prefix and question are input only. At test time only the label task runs: the rationale
is a training signal, not a chain of thought (``jaxeff eval --metric arithmetic_accuracy`` asks a
step_by_step run ``[label] a+b=``).

Data: one task per document, written by ``jaxeff distill-rationales CONFIG`` to the config's
``data.paths[0]`` (training: ``problems`` addition problems from the generator,
:func:`jaxeff.data.synthetic.arithmetic_additions`) and ``data.eval_paths[0]`` (``eval_problems``
others). ``rationale_source`` says where the rationales come from: ``generator`` (the exact carry
steps; the controlled study), ``teacher`` (the greedy continuation of ``[rationale] a+b=`` by the
run ``teacher_checkpoint``, the paper's setting: an LLM's rationales, right or wrong) or ``none``
(label lines only: the standard fine-tuning baseline). Labels are always the true answers.

The loss tells the tasks apart by the prefix at the start of each packed document (after ``bos``);
the continuation piece of a document split across two rows has no prefix and does not count. Both
prefixes and the marker must tokenize on their own as they do in a line (true for the byte tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field, model_validator

from jaxeff.errors import ConfigError
from jaxeff.schema import Section
from jaxeff.train.methods import Method, MethodContext, lm_forward, register_method

KEY = "step_by_step"


class StepByStepConfig(Section):
    rationale_weight: float = Field(1.0, ge=0.0)  # λ: loss = L_label + λ · L_rationale
    label_prefix: str = "[label] "  # the task prefix asking for the answer
    rationale_prefix: str = "[rationale] "  # the task prefix asking for the rationale
    answer_marker: str = "="  # a task's output starts after the first marker of its line (one token)
    # where distill-rationales takes the rationales: the generator's carry steps, a teacher run's
    # greedy generation, or none (label lines only: the label-only baseline)
    rationale_source: Literal["generator", "teacher", "none"] = "generator"
    teacher_checkpoint: str | None = None  # run folder (or its checkpoints folder) for rationale_source=teacher
    teacher_step: int | None = Field(None, ge=0)  # its checkpoint step; None = newest
    max_rationale_tokens: int = Field(64, gt=0)  # teacher tokens per rationale (cut at newline / eos)
    problems: int = Field(2000, gt=0)  # training-set size: addition problems in data.paths[0]
    eval_problems: int = Field(200, gt=0)  # problems in data.eval_paths[0] (other ones)
    digits: int = Field(3, ge=1, le=9)  # operands have 1..digits digits

    @model_validator(mode="after")
    def _check(self):
        a, b, m = self.label_prefix, self.rationale_prefix, self.answer_marker
        if not a or not b:
            raise ValueError("label_prefix and rationale_prefix must not be empty")
        if a.startswith(b) or b.startswith(a):
            raise ValueError(f"label_prefix {a!r} and rationale_prefix {b!r}: neither may start the other (the loss tells the tasks apart by them)")
        if not m or m in a or m in b or "\n" in a + b:
            raise ValueError(f"answer_marker {m!r}: expected a non-empty string found in neither prefix (and prefixes without newlines)")
        if self.rationale_source == "teacher" and not self.teacher_checkpoint:
            raise ValueError("teacher_checkpoint: rationale_source=teacher needs the teacher's run folder")
        return self


# --------------------------------------------------------------------------------------------------- data


def task_ids(section: StepByStepConfig, tokenizer) -> tuple[list[int], list[int], int]:
    """Token ids of the label prefix, the rationale prefix and the marker; a tokenizer that splits
    them differently from a whole line is a one-line ConfigError."""
    label, rationale = tokenizer.encode(section.label_prefix), tokenizer.encode(section.rationale_prefix)
    marker = tokenizer.encode(section.answer_marker)
    if len(marker) != 1:
        raise ConfigError(f"{KEY}.answer_marker: {section.answer_marker!r} is {len(marker)} tokens with this tokenizer (expected one)")
    for prefix, ids in ((section.label_prefix, label), (section.rationale_prefix, rationale)):
        line = tokenizer.encode(prefix + "1+2" + section.answer_marker)
        if line[: len(ids)] != ids or line[-1] != marker[0]:
            raise ConfigError(
                f"{KEY}: the prefix {prefix!r} or the marker tokenizes differently inside a line with "
                f"this tokenizer ({tokenizer!r}); use the byte tokenizer"
            )
    return label, rationale, marker[0]


def label_prompts(section: StepByStepConfig, tokenizer, n: int, seed: int) -> list[tuple[list[int], str]]:
    """``n`` ``(bos + label prefix + question + marker, answer)`` of fresh problems (seed ``seed``):
    how the label task is asked (the arithmetic_accuracy metric of a step_by_step run)."""
    from jaxeff.data.synthetic import arithmetic_additions

    task_ids(section, tokenizer)
    return [
        ([tokenizer.bos_id] + tokenizer.encode(f"{section.label_prefix}{p['question']}{section.answer_marker}"), p["answer"])
        for p in arithmetic_additions(n, seed, digits=section.digits)
    ]


def teacher_rationales(section: StepByStepConfig, problems, tokenizer, tokenizer_spec: str, batch: int = 128) -> list[str]:
    """The teacher run's greedy continuation of ``bos + rationale prefix + question + marker`` for each
    problem, up to its first newline or eos (``max_rationale_tokens`` at most)."""
    from jaxeff.evals import greedy_tokens, until
    from jaxeff.models import Transformer
    from jaxeff.runs import load_model_params

    t_cfg, params = load_model_params(section.teacher_checkpoint, section.teacher_step)
    if t_cfg.data.tokenizer != tokenizer_spec:
        raise ConfigError(
            f"{KEY}.teacher_checkpoint: the teacher reads tokenizer {t_cfg.data.tokenizer!r}, this run "
            f"data.tokenizer={tokenizer_spec!r}; they must be the same"
        )
    prompts = [[tokenizer.bos_id] + tokenizer.encode(f"{section.rationale_prefix}{p['question']}{section.answer_marker}") for p in problems]
    outs = greedy_tokens(Transformer(t_cfg.model), params, prompts, section.max_rationale_tokens, batch=batch)
    stop = {tokenizer.eos_id, *tokenizer.encode("\n")}
    return [tokenizer.decode(until(o, stop)) for o in outs]


def _records(section: StepByStepConfig, problems, rationales) -> list[dict]:
    out = []
    m = section.answer_marker
    for i, p in enumerate(problems):
        out.append({"text": f"{section.label_prefix}{p['question']}{m}{p['answer']}", "task": "label", "problem": i})
        if rationales is not None:
            out.append({"text": f"{section.rationale_prefix}{p['question']}{m}{rationales[i]}", "task": "rationale", "problem": i})
    return out


def _one_jsonl(paths, field: str) -> Path:
    if len(paths) != 1 or not str(paths[0]).endswith(".jsonl"):
        raise ConfigError(f"{field}: distill-rationales writes one .jsonl file here (got {list(paths)})")
    return Path(paths[0])


def write_data(cfg, *, force: bool = False) -> dict:
    """Write the run's multi-task data (see the module docstring) to ``data.paths[0]`` (training) and
    ``data.eval_paths[0]``; existing files are refused unless ``force``. Returns a summary."""
    from jaxeff.data.synthetic import arithmetic_additions
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.train.inputs import EVAL_SEED_OFFSET

    s = getattr(cfg, KEY)
    if cfg.data.source != "files":
        raise ConfigError("data.source: step_by_step trains on the files distill-rationales writes; expected 'files'")
    train_path = _one_jsonl(cfg.data.paths, "data.paths")
    eval_path = _one_jsonl(cfg.data.eval_paths, "data.eval_paths")
    for p in (train_path, eval_path):
        if p.exists() and not force:
            raise ConfigError(f"distill-rationales: '{p}' already exists (--force to overwrite)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    task_ids(s, tokenizer)
    train = arithmetic_additions(s.problems, cfg.data.seed, digits=s.digits)
    evals = arithmetic_additions(s.eval_problems, cfg.data.seed + EVAL_SEED_OFFSET, digits=s.digits)
    if s.rationale_source == "none":
        rationales = None
    elif s.rationale_source == "generator":
        rationales = [p["rationale"] for p in train]
    else:
        rationales = teacher_rationales(s, train, tokenizer, cfg.data.tokenizer)
    train_recs = _records(s, train, rationales)
    eval_recs = _records(s, evals, [p["rationale"] for p in evals])  # eval data: both tasks, true rationales
    for path, recs in ((train_path, train_recs), (eval_path, eval_recs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        tmp.replace(path)
    summary = {
        "train": str(train_path),
        "eval": str(eval_path),
        "problems": len(train),
        "train_records": len(train_recs),
        "eval_records": len(eval_recs),
        "rationale_source": s.rationale_source,
    }
    if rationales is not None and s.rationale_source == "teacher":
        summary["teacher_rationales_exact"] = sum(r == p["rationale"] for r, p in zip(rationales, train)) / len(train)
    return summary


# --------------------------------------------------------------------------------------------------- loss


def task_masks(inputs, positions, loss_mask, *, bos_id: int, marker_id: int, prefixes) -> list[jax.Array]:
    """One float mask ``[batch, seq]`` per prefix in ``prefixes`` (token id lists): 1 where the target is
    an output token of a document that starts ``bos + prefix`` (in this row) -- the input is at or
    after the document's first ``marker_id`` -- and ``loss_mask`` counts it. Pieces of a document
    without their start in the row (packing split it) are in no mask."""
    b, t = inputs.shape
    idx = jnp.arange(t)[None, :]
    start = jnp.clip(idx - positions, 0, t - 1)  # positions restart at 0 at each piece

    def at(a, off):
        return jnp.take_along_axis(a, jnp.clip(start + off, 0, t - 1), axis=1)

    is_marker = (inputs == marker_id).astype(jnp.int32)
    seen = jnp.cumsum(is_marker, axis=1)
    seen = seen - (at(seen, 0) - at(is_marker, 0))  # markers from the piece's start up to here
    base = (at(inputs, 0) == bos_id) & (seen >= 1) & (loss_mask > 0)
    out = []
    for ids in prefixes:
        ok = base
        for j, tok in enumerate(ids):
            k = j + 1
            ok = ok & (at(inputs, k) == tok) & (at(positions, k) == k) & (start + k < t)
        out.append(ok.astype(jnp.float32))
    return out


def token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@register_method(KEY, config=StepByStepConfig)
def step_by_step_method(ctx: MethodContext) -> Method:
    """Multi-task training on labels and rationales (see the module docstring)."""
    cfg, model = ctx.cfg, ctx.model
    from jaxeff.data.tokenizer import load_tokenizer

    s = getattr(cfg, KEY)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    label_ids, rationale_ids, marker = task_ids(s, tokenizer)
    lam = float(s.rationale_weight)

    def loss(params, batch, rng, *, frozen, deterministic):
        out = lm_forward(model, params, batch, rng, deterministic)
        nll = token_nll(out.logits, batch["targets"])
        m_label, m_rat = task_masks(
            batch["inputs"], batch["positions"], batch["loss_mask"], bos_id=tokenizer.bos_id, marker_id=marker, prefixes=(label_ids, rationale_ids)
        )
        n_label, n_rat = m_label.sum(), m_rat.sum()
        l_label = (nll * m_label).sum() / jnp.maximum(n_label, 1.0)
        l_rat = (nll * m_rat).sum() / jnp.maximum(n_rat, 1.0)
        ce = (nll * (m_label + m_rat)).sum() / jnp.maximum(n_label + n_rat, 1.0)  # over both tasks' outputs
        return l_label + lam * l_rat, {"ce": ce, "label_ce": l_label, "rationale_ce": l_rat, "label_tokens": n_label, "rationale_tokens": n_rat}

    return Method(KEY, loss)


__all__ = ["StepByStepConfig", "task_ids", "label_prompts", "teacher_rationales", "write_data", "task_masks", "step_by_step_method"]
