"""safetensors files, read and written without the ``safetensors`` package.

A file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
data_offsets) and the raw little-endian tensor bytes. Reading maps the file: a device's slice is
a numpy view of the page cache (:meth:`Tensor.__getitem__`), and a whole tensor for one device
is one populated mapping copied (or transposed block by block) into a fresh 64-byte aligned
array (:meth:`Tensor.read`), which JAX's CPU client adopts without another copy.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any, Callable

import ml_dtypes  # bfloat16 as a numpy dtype
import numpy as np

from jaxeff.errors import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
NP_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ALIGN = 64  # bytes: JAX's CPU client uses (does not copy) host arrays aligned to this
TRANSPOSE_ROWS = 256  # rows per block of a transposed copy (keeps both sides in cache)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the whole range in at once


class Files:
    """The checkpoint's tensors: name -> safetensors file (from the index, or the single file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._headers: dict[Path, tuple[dict, int]] = {}  # file -> (header, data offset), read once
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"'{folder / INDEX}' is not a safetensors index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"'{folder}': shard {shard} listed in {INDEX} is missing")
            self.where = {name: folder / shard for name, shard in weight_map.items()}
        elif (folder / SINGLE).is_file():
            self._headers[folder / SINGLE] = read_header(folder / SINGLE)
            self.where = {name: folder / SINGLE for name in self._headers[folder / SINGLE][0]}
        else:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found {bins[0]}: PyTorch pickles are not read; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"'{folder}' has neither {SINGLE} nor {INDEX}{hint}")

    def tensor(self, name: str) -> "Tensor":
        """The tensor ``name`` (header checked; nothing is mapped until it is read)."""
        if name not in self.where:
            raise CheckpointError(f"'{self.folder}': tensor {name} is missing")
        file = self.where[name]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        header, start = self._headers[file]
        if name not in header:
            raise CheckpointError(f"'{file}': tensor {name} is listed but cannot be read (not in the file)")
        return Tensor(file, name, header[name], start)


def read_header(file: Path) -> tuple[dict, int]:
    """The safetensors header of ``file`` (tensor name -> dtype, shape, data_offsets) and the
    offset of the data section: an 8-byte little-endian length, then that many bytes of JSON."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"'{file}' is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class Tensor:
    """One tensor of a safetensors file: ``get_shape()``, ``get_dtype()`` (safetensors' code,
    e.g. ``BF16``), numpy indexing into the mapped bytes, and :meth:`read` of the whole."""

    def __init__(self, file: Path, name: str, meta: dict, data_start: int):
        try:
            code, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"'{file}': tensor {name} has a malformed header entry ({e})") from None
        self.file, self.name, self.code, self.shape = file, name, code, shape
        if code not in ST_DTYPES:
            raise CheckpointError(f"'{file}': tensor {name} has dtype {code}; expected one of {', '.join(ST_DTYPES)}")
        self.dtype = np.dtype(getattr(ml_dtypes, ST_DTYPES[code], None) or ST_DTYPES[code])
        self.nbytes = math.prod(shape) * self.dtype.itemsize
        if end - begin != self.nbytes:
            raise CheckpointError(f"'{file}': tensor {name} has {end - begin} bytes, expected {self.nbytes} for {code} {list(shape)}")
        self.offset = data_start + begin  # bytes from the start of the file
        self._view: np.ndarray | None = None

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def get_dtype(self) -> str:
        return self.code

    def _mapped(self, populate: bool) -> np.ndarray:
        """The tensor's bytes as a read-only array over a read-only mapping of its byte range."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        page = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.file, "rb") as f:
                how = dict(flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ) if populate and _POPULATE else dict(access=mmap.ACCESS_READ)
                m = mmap.mmap(f.fileno(), self.offset - page + self.nbytes, offset=page, **how)
        except (OSError, ValueError, OverflowError) as e:  # e.g. a truncated file: the mapping would pass its end
            raise CheckpointError(f"'{self.file}': tensor {self.name} is listed but cannot be read ({e})") from None
        return np.frombuffer(m, self.dtype, math.prod(self.shape), self.offset - page).reshape(self.shape)

    def __getitem__(self, index):
        if self._view is None:
            self._view = self._mapped(populate=False)
        return self._view[index]

    def close(self) -> None:
        self._view = None

    def read(self, *, transpose: bool = False, dtype=None) -> np.ndarray:
        """The whole tensor (transposed when asked: 2-d only), as ``dtype``, in a fresh array
        aligned to ``ALIGN`` bytes. One populated mapping (the kernel maps the page cache in one
        go instead of a fault per page); a transpose copies blocks of rows so both sides stay in
        cache, on same-size unsigned-int views when no cast is needed."""
        src = self._mapped(populate=True)
        dtype = np.dtype(dtype or self.dtype)
        shape = tuple(reversed(self.shape)) if transpose else self.shape
        out = aligned_empty(shape, dtype)
        if dtype == src.dtype:
            bits = np.dtype(f"u{dtype.itemsize}")
            src, out_view = src.view(bits), out.view(bits)
        else:
            out_view = out
        if not transpose:
            np.copyto(out_view, src, casting="unsafe")
        else:
            for i in range(0, src.shape[0], TRANSPOSE_ROWS):
                out_view[:, i : i + TRANSPOSE_ROWS] = src[i : i + TRANSPOSE_ROWS].T
        return out


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fresh array in its own private anonymous mapping: page aligned (JAX's CPU client adopts
    it), and without numpy's ``MADV_HUGEPAGE`` on large allocations, whose fault-time compaction
    made loading 2-3x slower here than the copy itself."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    if n == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        raw = np.empty(n + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start : start + n].view(dtype).reshape(shape)
    buffer = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return np.frombuffer(buffer, dtype).reshape(shape)


def write_safetensors(file: Path, entries: list[tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]]):
    """Stream tensors into one safetensors file (header first, then each tensor as produced), so
    only one tensor is on the host at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            a = np.ascontiguousarray(produce(), dtype=dtype)
            assert a.shape == tuple(shape), (name, a.shape, shape)
            f.write(a.reshape(-1).view(np.uint8))


__all__ = ["Files", "Tensor", "read_header", "write_safetensors", "aligned_empty", "SINGLE", "INDEX", "ST_DTYPES", "NP_TO_ST"]
