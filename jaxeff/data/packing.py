"""Pack tokenised documents into fixed-length rows for next-token training.

Layout (``pack_documents``): each document becomes ``[bos] + tokens + [eos]``; the documents are laid end
to end in one stream, which is cut into rows of ``seq_len`` tokens. So rows are filled greedily, and a
document that does not fit in the room left in a row is SPLIT: its first piece ends the row, the rest
starts the next row(s). Every piece is its own segment: ``segment_ids`` count 1, 2, ... within a row
(0 = padding) and ``positions`` restart at 0 at the start of every piece -- including a continuation piece,
which therefore starts at position 0 without a bos (the model sees it as a fresh, bos-less segment; no
attention crosses rows anyway).

Targets: ``targets[r, i]`` is the token that follows ``inputs[r, i]`` in the same document, and
``loss_mask`` is 1 there. At the end of a piece that was split, the target is the document's next token
(the first token of the next row) and ``loss_mask`` stays 1, so no training signal is lost to the split.
At a document's eos there is no next token of the same document: ``targets = pad_id``, ``loss_mask = 0``;
the same on padding (``inputs = targets = pad_id``, ``segment_ids = positions = loss_mask = 0``).
Within a segment, therefore, ``targets[r, i] == inputs[r, i + 1]``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from jaxeff.errors import DataError

__all__ = ["pack_documents", "pack_texts", "PACKED_KEYS"]

PACKED_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise DataError(f"packing: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def pack_documents(
    docs: Iterable[Sequence[int] | np.ndarray], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int, drop_remainder: bool = False
) -> dict[str, np.ndarray]:
    """Pack token-id documents into rows of ``seq_len``; see the module docstring for the layout.

    Returns ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32),
    each of shape ``[n_rows, seq_len]``. ``drop_remainder`` drops the last row if it is not full
    (otherwise it is padded). No documents -> ``n_rows == 0``."""
    seq_len = _check_int("seq_len", seq_len, 1)
    bos_id = _check_int("bos_id", bos_id, 0)
    eos_id = _check_int("eos_id", eos_id, 0)
    pad_id = _check_int("pad_id", pad_id, 0)

    toks: list[np.ndarray] = []
    for d in docs:
        a = np.asarray(d)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise DataError(f"packing: every document must be a 1-D sequence of integer token ids, got {a.dtype} {a.shape}")
        toks.append(np.concatenate([[bos_id], a.astype(np.int64, copy=False), [eos_id]]))
    if not toks:
        empty = np.zeros((0, seq_len), np.int32)
        return {
            "inputs": empty,
            "targets": empty.copy(),
            "segment_ids": empty.copy(),
            "positions": empty.copy(),
            "loss_mask": np.zeros((0, seq_len), np.float32),
        }
    lens = np.array([len(t) for t in toks], np.int64)
    stream = np.concatenate(toks)
    n = stream.size
    doc_start = np.zeros(n, bool)
    doc_start[np.cumsum(lens)[:-1]] = True
    doc_start[0] = True
    doc_end = np.zeros(n, bool)
    doc_end[np.cumsum(lens) - 1] = True

    # next token of the same document, or pad at each document's eos
    targets = np.empty(n, np.int64)
    targets[:-1] = stream[1:]
    targets[doc_end] = pad_id
    loss = (~doc_end).astype(np.float32)

    n_rows = n // seq_len if drop_remainder else -(-n // seq_len)
    total = n_rows * seq_len
    valid = np.zeros(total, bool)
    keep = min(n, total)
    valid[:keep] = True

    def fit(a: np.ndarray, fill) -> np.ndarray:
        out = np.full(total, fill, a.dtype)
        out[:keep] = a[:keep]
        return out

    stream_p = fit(stream, pad_id)
    targets_p = fit(targets, pad_id)
    loss_p = fit(loss, 0.0)
    idx = np.arange(total)
    col = idx % seq_len
    seg_start = fit(doc_start, False) | ((col == 0) & valid)
    # segment number within the row: running count of starts minus the count before the row began
    cs = np.cumsum(seg_start)
    row_base = np.repeat(np.concatenate([[0], cs[seq_len - 1 :: seq_len][:-1]]), seq_len)
    segment_ids = np.where(valid, cs - row_base, 0)
    # position within the piece: distance to the latest segment start
    last_start = np.maximum.accumulate(np.where(seg_start, idx, 0))
    positions = np.where(valid, idx - last_start, 0)

    shape = (n_rows, seq_len)
    return {
        "inputs": stream_p.astype(np.int32).reshape(shape),
        "targets": targets_p.astype(np.int32).reshape(shape),
        "segment_ids": segment_ids.astype(np.int32).reshape(shape),
        "positions": positions.astype(np.int32).reshape(shape),
        "loss_mask": loss_p.astype(np.float32).reshape(shape),
    }


def pack_texts(texts: Sequence[str], tokenizer, seq_len: int, *, drop_remainder: bool = False) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` with ``tokenizer`` (ByteTokenizer / HFTokenizer) and ``pack_documents`` them with
    its bos/eos/pad ids."""
    return pack_documents(
        tokenizer.encode_batch(list(texts)),
        seq_len,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        drop_remainder=drop_remainder,
    )
