"""Real text from LOCAL files, read through Hugging Face ``datasets`` (never from the Hub).

Formats (``format="auto"`` picks by extension, per file):

* ``text`` (``.txt``, ``.text``, ``.md``): each FILE is one document, kept verbatim (trailing newline
  included) -- ``load_dataset("text", sample_by="document")``. One-document-per-file keeps books, source
  files and articles whole, which matters for long-context training; split a corpus into several files if
  you want several documents.
* ``json`` (``.json``, ``.jsonl``, ``.ndjson``): one record per line (or a JSON array); the document is
  the ``text_field`` column.
* ``parquet`` (``.parquet``): the document is the ``text_field`` column.

Paths are taken literally (glob characters such as ``*`` or ``[`` in a file name are escaped).
Documents come back in path order, then row order. Empty strings and nulls are skipped (they would be
nothing but bos/eos after tokenisation). The ``datasets`` cache goes to a fresh temporary directory that is
deleted afterwards and the data are kept in memory, so nothing is written under the user's home (the
``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` variables are not needed for local files, but are honoured).
"""

from __future__ import annotations

import glob
import os
import tempfile

from jaxeff.errors import DataError

__all__ = ["load_text_documents", "FORMATS", "EXTENSIONS"]

FORMATS = ("auto", "text", "json", "parquet")
EXTENSIONS: dict[str, str] = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
_FORMAT_ALIASES = {"txt": "text", "jsonl": "json"}


def _one_line(e: BaseException) -> str:
    """The message of the innermost cause (``datasets`` wraps the useful pyarrow error), on one line."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen.add(id(e))
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _check_utf8(path: str, where: str, chunk: int = 1 << 20) -> None:
    """A :class:`DataError` naming the first byte of ``path`` that is not UTF-8 (pyarrow and the json
    reader would fail on it with a traceback, or deep inside ``datasets``)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:  # e.object = pending bytes + block
                    raise DataError(
                        f"{where}: {path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {offset - pending + e.start})"
                    ) from None
                if not block:
                    return
                offset += len(block)
    except OSError as e:
        raise DataError(f"{where}: cannot read {path!r} ({e.strerror})") from None


def load_text_documents(paths: list[str], *, format: str = "auto", text_field: str = "text", field_name: str = "data.paths") -> list[str]:
    """Read the documents of local text/json/jsonl/parquet files; see the module docstring.

    ``field_name`` is the config field the paths came from, used in error messages
    (``"data.paths[1]: file 'x.txt' does not exist"``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # type: ignore[list-item]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError(f"{field_name}: no files given (expected a list of .txt/.jsonl/.json/.parquet paths)")
    fmt_req = _FORMAT_ALIASES.get(format, format)
    if fmt_req not in FORMATS:
        raise DataError(f"data.format: unknown format {format!r} (expected one of: {', '.join(FORMATS)})")

    formats: list[str] = []
    for i, p in enumerate(paths):
        where = f"{field_name}[{i}]"
        if not os.path.exists(p):
            raise DataError(f"{where}: file {p!r} does not exist")
        if os.path.isdir(p):
            raise DataError(f"{where}: {p!r} is a directory (expected a file)")
        if fmt_req == "auto":
            ext = os.path.splitext(p)[1].lower()
            if ext not in EXTENSIONS:
                raise DataError(
                    f"{where}: cannot tell the format of {p!r} from its extension {ext or '(none)'!r} "
                    f"(expected one of: {', '.join(EXTENSIONS)}; or set the format explicitly)"
                )
            formats.append(EXTENSIONS[ext])
        else:
            formats.append(fmt_req)

    import datasets

    docs: list[str] = []
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # per-file "Generating train split" bars are noise here
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error logs repeat the DataError we raise
    try:
        _load_into(docs, paths, formats, text_field, field_name)
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()
    return docs


def _load_into(docs: list[str], paths: list[str], formats: list[str], text_field: str, field_name: str) -> None:
    import datasets

    with tempfile.TemporaryDirectory(prefix="jaxeff-datasets-") as cache_dir:
        for i, (p, fmt) in enumerate(zip(paths, formats)):
            where = f"{field_name}[{i}]"
            if fmt in ("text", "json"):
                _check_utf8(p, where)
            kwargs = {"sample_by": "document"} if fmt == "text" else {}
            try:
                ds = datasets.load_dataset(
                    fmt, data_files=[glob.escape(os.path.abspath(p))], split="train", cache_dir=cache_dir, keep_in_memory=True, **kwargs
                )
            except Exception as e:  # malformed JSON/parquet and friends
                raise DataError(f"{where}: cannot read {p!r} as {fmt}: {_one_line(e)}") from None
            field = "text" if fmt == "text" else text_field
            if field not in ds.column_names:
                raise DataError(f"data.text_field: {where} ({p!r}) has no column {field!r} (columns found: {', '.join(ds.column_names) or 'none'})")
            for j, t in enumerate(ds[field]):
                if t is None or t == "":
                    continue
                if not isinstance(t, str):
                    raise DataError(f"data.text_field: {where} ({p!r}) row {j}: column {field!r} holds {type(t).__name__}, expected a string")
                docs.append(t)
