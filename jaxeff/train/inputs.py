"""From the ``data`` config section to a training loader and per-domain eval sets."""

from __future__ import annotations

import os

import numpy as np

from jaxeff.config import DataConfig
from jaxeff.data.loader import MixtureLoader
from jaxeff.data.packing import pack_texts
from jaxeff.data.synthetic import generate_documents
from jaxeff.data.tokenizer import load_tokenizer
from jaxeff.errors import ConfigError

EVAL_SEED_OFFSET = 1_000_003  # eval documents come from a different seed than training ones


def build_data(cfg: DataConfig, vocab_size: int):
    """Returns ``(tokenizer, loader, eval_sets)``; ``eval_sets`` maps domain -> packed arrays."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})")
    train, evals = {}, {}
    if cfg.source == "synthetic":
        for name in cfg.domains:
            docs = generate_documents(name, cfg.docs_per_domain, cfg.seed, doc_len=cfg.doc_len)
            eval_docs = generate_documents(name, cfg.eval_docs_per_domain, cfg.seed + EVAL_SEED_OFFSET, doc_len=cfg.doc_len)
            train[name] = pack_texts(docs, tokenizer, cfg.seq_len)
            evals[name] = pack_texts(eval_docs, tokenizer, cfg.seq_len)
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from jaxeff.data.files import load_text_documents

        docs = load_text_documents(list(cfg.paths), format=cfg.format, text_field=cfg.text_field, field_name="data.paths")
        if cfg.eval_paths:
            eval_docs = load_text_documents(list(cfg.eval_paths), format=cfg.format, text_field=cfg.text_field, field_name="data.eval_paths")
        else:
            order = np.random.default_rng(cfg.seed).permutation(len(docs))
            n_eval = int(round(len(docs) * cfg.eval_fraction)) if len(docs) > 1 else 0
            eval_docs = [docs[i] for i in order[:n_eval]]
            docs = [docs[i] for i in order[n_eval:]]
        train["files"] = pack_texts(docs, tokenizer, cfg.seq_len)
        if eval_docs:
            evals["files"] = pack_texts(eval_docs, tokenizer, cfg.seq_len)
    for name, packed in train.items():
        if packed["inputs"].shape[0] == 0:
            raise ConfigError(f"data: domain '{name}' produced no training rows")
    loader = MixtureLoader(train, cfg.batch_size, weights=dict(cfg.weights) if cfg.weights else None, seed=cfg.seed)
    return tokenizer, loader, evals
