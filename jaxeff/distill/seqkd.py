"""Sequence-level knowledge distillation (Kim & Rush, 2016): the teacher's outputs become the data.

Word-level KD (method ``distill``) matches the teacher's next-token distribution at every position
of the real data. Sequence-level KD instead trains the student with plain cross-entropy (method
``lm``) on sequences the teacher *generates* -- in the paper, the teacher's beam-search translation
of every training source sentence; for an LM here, the teacher's continuation of a context taken
from its own training data. This is also how DeepSeek-R1's small models were distilled.

:func:`generate_dataset` (``jaxeff distill-generate TEACHER --out DATA``):

* prompts: by default ``num`` windows of ``prompt_tokens`` tokens cut from the teacher run's own
  training documents (its ``data`` section: the embedded corpus or ``data.paths``), documents taken
  in a seeded random order (cycling when ``num`` exceeds them), each window at a seeded random
  offset of its document (offset 0 starts with ``bos``, like the start of a packed document; others,
  like the continuation pieces packing makes, do not); or the lines of a ``--prompts`` file
  (``.txt``: one prompt per line; ``.jsonl``: its ``text`` field);
* continuations: ``max_new_tokens`` tokens from the teacher with a KV cache, greedy by default
  (``temperature 0``: the mode-seeking choice closest to the paper's beam search) or sampled with
  ``temperature`` / ``top_k``; cut at the teacher's ``eos``;
* output: a ``.jsonl`` (or ``.parquet``) file, one record per sample ``{"text": prompt +
  continuation, "prompt", "domain"}``; a student reads it with ``data.source=files
  data.paths=[DATA]`` (``text`` is the default ``data.text_field``) and trains on the whole text.

Deterministic: the same teacher, settings and ``seed`` give the same file (the sampling key of
batch ``i`` is ``fold_in(PRNGKey(seed), i)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxeff.errors import ConfigError, DataError

OUT_FORMATS = (".jsonl", ".parquet")


def _positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}: expected a positive integer (got {value!r})")
    return value


def check_out(out) -> Path:
    out = Path(out)
    if out.suffix not in OUT_FORMATS:
        raise ConfigError(f"--out: expected a .jsonl or .parquet file name (got {str(out)!r})")
    if out.exists():
        raise ConfigError(f"--out: '{out}' already exists; choose another file")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out: '{out.parent}' is not a folder")
    return out


def training_documents(data_cfg) -> list[tuple[str, str]]:
    """``(domain, text)`` of the training documents a run's ``data`` section reads (the same split
    :func:`jaxeff.train.inputs.build_data` makes: the embedded corpus' training seed, or the files
    minus their eval share)."""
    if data_cfg.source == "synthetic":
        from jaxeff.data.synthetic import generate_documents

        return [
            (name, d) for name in data_cfg.domains for d in generate_documents(name, data_cfg.docs_per_domain, data_cfg.seed, doc_len=data_cfg.doc_len)
        ]
    from jaxeff.data.files import load_text_documents

    docs = load_text_documents(list(data_cfg.paths), format=data_cfg.format, text_field=data_cfg.text_field, field_name="data.paths")
    if not data_cfg.eval_paths:
        order = np.random.default_rng(data_cfg.seed).permutation(len(docs))
        n_eval = int(round(len(docs) * data_cfg.eval_fraction)) if len(docs) > 1 else 0
        docs = [docs[i] for i in order[n_eval:]]
    return [("files", d) for d in docs]


def run_prompts(docs: list[tuple[str, str]], tokenizer, *, num: int, prompt_tokens: int, seed: int):
    """``[(domain, prompt ids)]``: ``num`` windows of ``prompt_tokens`` tokens (see the module docstring)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    out = []
    for i in range(num):
        domain, text = docs[order[i % len(docs)]]
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        if len(ids) < prompt_tokens:
            raise DataError(f"--prompt-tokens: {prompt_tokens} is longer than a training document ({len(ids)} tokens with bos)")
        start = int(rng.integers(0, len(ids) - prompt_tokens + 1))
        out.append((domain, ids[start : start + prompt_tokens]))
    return out


def file_prompts(path, tokenizer, num: int | None) -> list[tuple[str, list[int]]]:
    """``[("prompts", bos + ids)]`` of the lines of a ``.txt`` file or the ``text`` field of a ``.jsonl`` file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts: file '{p}' does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"--prompts: '{p}' is not UTF-8 text") from None
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"--prompts: '{p}' line {n} is not JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"--prompts: '{p}' line {n} has no string field 'text'")
            texts.append(rec["text"])
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise DataError(f"--prompts: '{p}' holds no prompts")
    texts = texts if num is None else texts[:num]
    return [("prompts", [tokenizer.bos_id] + tokenizer.encode(t)) for t in texts]


def generate_dataset(
    teacher,
    out,
    *,
    num: int | None = None,
    prompt_tokens: int = 16,
    max_new_tokens: int = 112,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    prompts=None,
    step: int | None = None,
) -> dict:
    """Write the teacher's continuations of the prompts to ``out`` (.jsonl / .parquet); returns a
    summary ``{"samples", "tokens", "path", ...}``. ``num`` defaults to the number of training
    documents (run prompts) or of prompt lines (``prompts`` file)."""
    import jax

    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.models import Transformer
    from jaxeff.models.generate import check_sampling, check_seed, generate
    from jaxeff.runs import load_model_params
    from jaxeff.train.checkpoint import find_checkpoint_dir

    out = check_out(out)
    if num is not None:
        _positive(num, "--num")
    _positive(prompt_tokens, "--prompt-tokens")
    _positive(max_new_tokens, "--max-new-tokens")
    _positive(batch_size, "--batch-size")
    check_sampling(temperature, top_k, None)
    check_seed(seed)
    find_checkpoint_dir(teacher)  # a missing run: one line before any work
    cfg, params = load_model_params(teacher, step)
    check_sampling(temperature, top_k, cfg.model.vocab_size)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if prompts is not None:
        items = file_prompts(prompts, tokenizer, num)
    else:
        docs = training_documents(cfg.data)
        items = run_prompts(docs, tokenizer, num=num or len(docs), prompt_tokens=prompt_tokens, seed=seed)
    longest = max(len(ids) for _, ids in items)
    if longest + max_new_tokens > cfg.model.max_seq_len:
        raise ConfigError(
            f"--prompt-tokens/--max-new-tokens: {longest} prompt + {max_new_tokens} new tokens exceed the teacher's max_seq_len={cfg.model.max_seq_len}"
        )
    model = Transformer(cfg.model)
    gen = jax.jit(lambda p, ids, key: generate(model, p, ids, key, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k))
    # same-length prompts go together (generate takes one prompt length per batch)
    by_len: dict[int, list[int]] = {}
    for i, (_, ids) in enumerate(items):
        by_len.setdefault(len(ids), []).append(i)
    new_ids: dict[int, list[int]] = {}
    base_key = jax.random.PRNGKey(seed)
    batch_no = 0
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            rows = np.asarray([items[i][1] for i in part] + [items[part[0]][1]] * (batch_size - len(part)), np.int32)
            toks = np.asarray(gen(params, rows, jax.random.fold_in(base_key, batch_no)))
            batch_no += 1
            for r, i in enumerate(part):
                t = [int(x) for x in toks[r]]
                new_ids[i] = t[: t.index(tokenizer.eos_id)] if tokenizer.eos_id in t else t
    records, n_tokens = [], 0
    for i, (domain, ids) in enumerate(items):
        prompt = tokenizer.decode(ids)
        cont = tokenizer.decode(new_ids[i])
        records.append({"text": prompt + cont, "prompt": prompt, "domain": domain})
        n_tokens += len(ids) + len(new_ids[i])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if out.suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    tmp.replace(out)
    return {
        "path": str(out),
        "samples": len(records),
        "tokens": n_tokens,
        "teacher": str(teacher),
        "prompt_tokens": prompt_tokens if prompts is None else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
        "mean_new_tokens": float(np.mean([len(v) for v in new_ids.values()])) if new_ids else math.nan,
    }


__all__ = ["generate_dataset", "training_documents", "run_prompts", "file_prompts", "check_out"]
