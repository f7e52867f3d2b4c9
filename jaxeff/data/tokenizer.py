"""Tokenizers: a dependency-free byte tokenizer and a wrapper around a local Hugging Face ``tokenizer.json``.

Both expose the same interface::

    name: str            # "byte", or the path of the tokenizer.json
    vocab_size: int      # number of ids the model's embedding must cover
    bos_id, eos_id, pad_id: int
    encode(text) -> list[int]                 # no special tokens added
    encode_batch(texts) -> list[list[int]]    # same, for many texts
    decode(ids) -> str                        # special tokens skipped
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence

from jaxeff.errors import DataError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "check_text"]


def check_text(text: str, field: str) -> str:
    """``text`` if it is valid Unicode; else a one-line :class:`DataError` naming ``field`` and the first
    bad byte. (Command-line arguments that are not valid UTF-8 reach Python as lone surrogates.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start : e.end].encode("utf-8", "surrogateescape") if "\udc80" <= text[e.start] <= "\udcff" else b""
        what = f"byte 0x{raw[0]:02x}" if raw else f"character U+{ord(text[e.start]):04X}"
        raise DataError(f"{field}: not valid UTF-8 text ({what} at character {e.start})") from None
    return text


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = pad, 257 = bos, 258 = eos (vocab_size 259)."""

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids (and any id outside 0..255, e.g. from a padded vocab) are skipped;
        invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


# Looked up in this order; the first token present in the vocabulary wins.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
_ADDED_SPECIAL = "<|endoftext|>"


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (loaded with ``tokenizers.Tokenizer.from_file``); ``path`` may
    also be a directory holding a ``tokenizer.json`` (e.g. a downloaded model folder).

    Special ids are looked up among common special tokens (see ``_BOS_CANDIDATES`` etc.). Fallbacks:
    no bos -> eos is used as bos; no eos -> bos is used as eos; neither -> the special token
    ``<|endoftext|>`` is added to the tokenizer (so ``vocab_size`` grows by one) and used for both;
    no pad -> eos is used as pad (padding positions always have loss_mask 0, so this is harmless).
    """

    def __init__(self, path: str):
        import tokenizers

        if os.path.isdir(path):
            inner = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(inner):
                raise DataError(
                    f"data.tokenizer: {path!r} is a directory without a tokenizer.json (expected 'byte' or a path to a Hugging Face tokenizer.json file)"
                )
            path = inner
        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer: file {path!r} does not exist (expected 'byte' or a path to a Hugging Face tokenizer.json)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception subclasses with multi-line messages
            msg = " ".join(str(e).split())
            raise DataError(f"data.tokenizer: cannot read {path!r} as a Hugging Face tokenizer.json: {msg}") from None
        self.name = path

        def find(cands: tuple[str, ...]) -> int | None:
            for c in cands:
                i = self._tok.token_to_id(c)
                if i is not None:
                    return int(i)
            return None

        bos, eos, pad = find(_BOS_CANDIDATES), find(_EOS_CANDIDATES), find(_PAD_CANDIDATES)
        if bos is None and eos is None:
            self._tok.add_special_tokens([_ADDED_SPECIAL])
            bos = eos = int(self._tok.token_to_id(_ADDED_SPECIAL))
        if bos is None:
            bos = eos
        if eos is None:
            eos = bos
        if pad is None:
            pad = eos
        assert bos is not None and eos is not None
        self.bos_id: int = bos
        self.eos_id: int = eos
        self.pad_id: int = pad
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | None) -> ByteTokenizer | HFTokenizer:
    """None or "byte" -> ByteTokenizer; anything else is the path of a local tokenizer.json."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data.tokenizer: got {spec!r} (expected 'byte' or a path to a Hugging Face tokenizer.json)")
    return HFTokenizer(spec)
