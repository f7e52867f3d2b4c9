"""The tokenizer files of a Hugging Face export: ``tokenizer.json`` and ``generation_config.json``.

jaxeff's byte tokenizer (ids 0..255 = UTF-8 bytes, 256 = pad, 257 = bos, 258 = eos) is written as a
``tokenizers`` BPE model without merges over the 256 byte-level symbols (the GPT-2 byte-to-unicode
alphabet; a ``ByteLevel`` pre-tokenizer without regex split or prefix space maps every byte to its
symbol), so ``Tokenizer.from_file`` encodes any text to exactly the ids jaxeff uses and decodes them
back; ``<pad>``, ``<s>``, ``</s>`` are special tokens 256..258. Only JSON is written (no
``tokenizers`` import needed).
"""

from __future__ import annotations

import json
from pathlib import Path

BYTE_SPECIALS = (("<pad>", 256), ("<s>", 257), ("</s>", 258))


def byte_symbols() -> list[str]:
    """The printable character standing for each byte 0..255 (GPT-2's byte-level alphabet): bytes
    that are visible Latin-1 characters stand for themselves, the others for 256, 257, ... in order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = set(visible)
    out, extra = [], 0
    for b in range(256):
        if b in shown:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def byte_tokenizer_json() -> dict:
    """The ``tokenizer.json`` document of jaxeff's byte tokenizer."""
    vocab = {sym: i for i, sym in enumerate(byte_symbols())}
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for tok, i in BYTE_SPECIALS
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def write_tokenizer_files(out: Path, tokenizer_spec: str, max_seq_len: int) -> list[str]:
    """Write ``tokenizer.json`` (the byte tokenizer's, or a copy of the run's own) and
    ``generation_config.json`` (bos/eos/pad ids, greedy) into the export ``out``; the names written."""
    from jaxeff.data.tokenizer import load_tokenizer

    out = Path(out)
    written = []
    if tokenizer_spec == "byte":
        (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False))
        written.append("tokenizer.json")
        bos, eos, pad = 257, 258, 256
    else:
        src = Path(tokenizer_spec)
        src = src / "tokenizer.json" if src.is_dir() else src
        if src.is_file():
            (out / "tokenizer.json").write_bytes(src.read_bytes())
            written.append("tokenizer.json")
        tok = load_tokenizer(tokenizer_spec)
        bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False, "max_length": max_seq_len}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    written.append("generation_config.json")
    return written


__all__ = ["byte_symbols", "byte_tokenizer_json", "write_tokenizer_files"]
