"""Deterministic, resumable mixture loader over packed domains, plus eval batching and per-process slicing.

``MixtureLoader.next_batch()`` for step ``t``:

1. the domain of each of the ``batch_size`` rows is drawn i.i.d. from the current weights with
   ``default_rng([seed % 2**64, t, 0x6d6978])``;
2. rows are served in order of the batch: a row of domain ``d`` is row ``perm[cursor_d]`` of that
   domain's packed arrays, where ``perm`` is the permutation for the domain's current epoch,
   ``default_rng([seed % 2**64, d, epoch_d, 0x7065726d]).permutation(n_rows_d)``; the cursor then
   advances, and when it reaches ``n_rows_d`` the domain's epoch increments and its cursor goes back to 0.

So a batch is a pure function of (seed, step, current weights, cursors and epochs), and ``state_dict()``
(step, weights, cursor and epoch per domain) is everything needed to resume exactly.

``weights=None`` means UNIFORM over the domains (not proportional to their size): the synthetic domains
differ in size only by accident of tokenisation, and a uniform mixture is the neutral starting point for
dynamic re-weighting via ``set_weights``. Domains keep their dict order; ``domain_ids`` index
``loader.domain_names``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from jaxeff.errors import DataError

from .packing import PACKED_KEYS

__all__ = ["MixtureLoader", "eval_batches", "process_slice", "BATCH_KEYS"]

BATCH_KEYS = PACKED_KEYS + ("domain_ids",)
_STATE_VERSION = 1
_DRAW_TAG = 0x6D6978  # "mix"
_PERM_TAG = 0x7065726D  # "perm"


def _check_packed(where: str, arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    if not isinstance(arrays, Mapping):
        raise DataError(f"{where}: expected the dict returned by pack_documents, got {type(arrays).__name__}")
    missing = [k for k in PACKED_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{where}: missing arrays {', '.join(missing)} (expected the dict returned by pack_documents)")
    shape = np.shape(arrays["inputs"])
    if len(shape) != 2:
        raise DataError(f"{where}: 'inputs' must have shape [n_rows, seq_len], got {shape}")
    for k in PACKED_KEYS:
        if np.shape(arrays[k]) != shape:
            raise DataError(f"{where}: '{k}' has shape {np.shape(arrays[k])}, expected {shape} like 'inputs'")
    return int(shape[0]), int(shape[1])


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"data.batch_size: must be a positive integer, got {batch_size!r}")
    return int(batch_size)


class MixtureLoader:
    """Global batches drawn from a weighted mixture of packed domains; see the module docstring."""

    def __init__(self, domains: dict[str, dict[str, np.ndarray]], batch_size: int, weights: dict[str, float] | None = None, seed: int = 0):
        if not isinstance(domains, Mapping) or not domains:
            raise DataError("data.domains: the mixture needs at least one domain")
        self.batch_size = _check_batch_size(batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DataError(f"data.seed: must be an integer, got {seed!r}")
        self.seed = int(seed)
        self._entropy = self.seed % 2**64  # numpy seeds must be non-negative; negative seeds wrap
        self.domain_names: list[str] = [str(k) for k in domains]
        self._arrays: list[dict[str, np.ndarray]] = []
        self._n_rows: list[int] = []
        seq_len = None
        for name, arrays in domains.items():
            n, s = _check_packed(f"data.domains[{name!r}]", arrays)
            if n == 0:
                raise DataError(f"data.domains[{name!r}]: has no rows (too little text for one row?)")
            if seq_len is None:
                seq_len = s
            elif s != seq_len:
                raise DataError(f"data.domains[{name!r}]: seq_len {s} differs from {seq_len} of {self.domain_names[0]!r}")
            self._arrays.append({k: np.asarray(arrays[k]) for k in PACKED_KEYS})
            self._n_rows.append(n)
        assert seq_len is not None
        self.seq_len: int = seq_len
        self.step = 0
        self._cursor = [0] * len(self._arrays)
        self._epoch = [0] * len(self._arrays)
        self._perm_cache: list[tuple[int, np.ndarray] | None] = [None] * len(self._arrays)
        self._w = np.full(len(self._arrays), 1.0 / len(self._arrays))
        if weights is not None:
            self.set_weights(weights)

    # ------------------------------------------------------------------------------------------- weights
    @property
    def weights(self) -> dict[str, float]:
        """Current normalised weights (sum 1), by domain name."""
        return {n: float(w) for n, w in zip(self.domain_names, self._w)}

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the mixture weights (takes effect from the next batch). Every key must be a known domain;
        domains left out get weight 0; values must be finite and >= 0 with a positive sum; they are
        normalised to sum to 1."""
        if not isinstance(weights, Mapping):
            raise DataError(f"data.weights: expected a mapping from domain name to weight, got {type(weights).__name__}")
        unknown = [k for k in weights if k not in self.domain_names]
        if unknown:
            raise DataError(f"data.weights: unknown domain(s) {', '.join(map(repr, unknown))} (known: {', '.join(self.domain_names)})")
        w = np.zeros(len(self.domain_names))
        for k, v in weights.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise DataError(f"data.weights[{k!r}]: expected a number, got {v!r}") from None
            if not math.isfinite(f) or f < 0:
                raise DataError(f"data.weights[{k!r}]: must be a finite number >= 0, got {v!r}")
            w[self.domain_names.index(k)] = f
        if w.sum() <= 0:
            raise DataError("data.weights: the weights sum to 0 (at least one domain needs a positive weight)")
        self._w = w / w.sum()

    # ------------------------------------------------------------------------------------------- batches
    def _perm(self, d: int) -> np.ndarray:
        cached = self._perm_cache[d]
        if cached is None or cached[0] != self._epoch[d]:
            perm = np.random.default_rng([self._entropy, d, self._epoch[d], _PERM_TAG]).permutation(self._n_rows[d])
            cached = (self._epoch[d], perm)
            self._perm_cache[d] = cached
        return cached[1]

    def next_batch(self) -> dict[str, np.ndarray]:
        """The GLOBAL batch for the current step (then the step advances): ``inputs``, ``targets``,
        ``segment_ids``, ``positions`` (int32), ``loss_mask`` (float32) of shape [batch_size, seq_len]
        and ``domain_ids`` [batch_size] int32."""
        rng = np.random.default_rng([self._entropy, self.step, _DRAW_TAG])
        dom = rng.choice(len(self._arrays), size=self.batch_size, p=self._w)
        rows = np.empty(self.batch_size, np.int64)
        for i, d in enumerate(dom):
            d = int(d)
            rows[i] = self._perm(d)[self._cursor[d]]
            self._cursor[d] += 1
            if self._cursor[d] == self._n_rows[d]:
                self._cursor[d] = 0
                self._epoch[d] += 1
        out = {k: np.empty((self.batch_size, self.seq_len), self._arrays[0][k].dtype) for k in PACKED_KEYS}
        for d in np.unique(dom):
            sel = dom == d
            for k in PACKED_KEYS:
                out[k][sel] = self._arrays[int(d)][k][rows[sel]]
        out["domain_ids"] = dom.astype(np.int32)
        self.step += 1
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next_batch()

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: {"version", "seed", "step", "weights": {name: w},
        "domains": {name: {"cursor", "epoch", "n_rows"}}}."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "step": self.step,
            "weights": self.weights,
            "domains": {n: {"cursor": self._cursor[i], "epoch": self._epoch[i], "n_rows": self._n_rows[i]} for i, n in enumerate(self.domain_names)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the following batches are then identical to those of the loader that
        saved it. The domains (names and row counts) and seed must match, else DataError."""
        where = "data loader state"
        try:
            version = state["version"]
            seed, step, weights, doms = state["seed"], state["step"], state["weights"], state["domains"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: missing entry {e} (expected a dict from MixtureLoader.state_dict())") from None
        if version != _STATE_VERSION:
            raise DataError(f"{where}: version {version!r} is not supported (expected {_STATE_VERSION})")
        if seed != self.seed:
            raise DataError(f"{where}: was saved with seed {seed}, but this loader has seed {self.seed}")
        if list(doms) != self.domain_names:
            raise DataError(f"{where}: was saved for domains {', '.join(doms)}, but this loader has {', '.join(self.domain_names)}")
        cursors, epochs = [], []
        for i, n in enumerate(self.domain_names):
            ds = doms[n]
            if ds.get("n_rows") != self._n_rows[i]:
                raise DataError(
                    f"{where}: domain {n!r} had {ds.get('n_rows')} rows when saved but has {self._n_rows[i]} now (the data or seq_len changed)"
                )
            c, e = ds.get("cursor"), ds.get("epoch")
            if not (isinstance(c, int) and 0 <= c < self._n_rows[i] and isinstance(e, int) and e >= 0):
                raise DataError(f"{where}: domain {n!r} has invalid cursor {c!r} / epoch {e!r}")
            cursors.append(c)
            epochs.append(e)
        if not (isinstance(step, int) and step >= 0):
            raise DataError(f"{where}: invalid step {step!r}")
        self.set_weights(weights)  # validates; then keep the saved values bit-exactly (no re-normalisation)
        self._w = np.array([float(weights[n]) if n in weights else 0.0 for n in self.domain_names])
        self.step = step
        self._cursor = cursors
        self._epoch = epochs


def eval_batches(domain_arrays: Mapping[str, np.ndarray], batch_size: int, *, pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Fixed, in-order batches over one domain's packed eval arrays (no shuffling, no repetition): rows
    ``[0, B)``, ``[B, 2B)``, ... The last batch is completed with padding rows (``inputs``/``targets`` =
    ``pad_id``, all other arrays 0, so ``loss_mask`` 0); every batch has exactly ``batch_size`` rows.
    Yields the five packed arrays (no ``domain_ids``)."""
    n, seq_len = _check_packed("eval data", domain_arrays)
    batch_size = _check_batch_size(batch_size)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {}
        for k in PACKED_KEYS:
            a = np.asarray(domain_arrays[k])
            part = a[start:stop]
            if stop - start < batch_size:
                fill = pad_id if k in ("inputs", "targets") else 0
                pad = np.full((batch_size - (stop - start), seq_len), fill, a.dtype)
                part = np.concatenate([part, pad])
            else:
                part = part.copy()
            batch[k] = part
        yield batch


def process_slice(batch: Mapping[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """The rows of a global batch that process ``process_index`` of ``process_count`` feeds: the
    ``process_index``-th of ``process_count`` equal contiguous blocks of rows (every array is sliced along
    axis 0). The batch size must be divisible by ``process_count``."""
    if isinstance(process_count, bool) or not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise DataError(f"process_count must be a positive integer, got {process_count!r}")
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be an integer in [0, {process_count}), got {process_index!r}")
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if not sizes:
        raise DataError("process_slice: the batch has no arrays")
    if len(set(sizes.values())) != 1:
        raise DataError(f"process_slice: arrays of the batch have different numbers of rows: {sizes}")
    (b,) = set(sizes.values())
    if b % process_count:
        raise DataError(
            f"data.batch_size: {b} is not divisible by the number of processes {process_count} (each process must feed the same number of rows)"
        )
    per = b // process_count
    return {k: v[process_index * per : (process_index + 1) * per] for k, v in batch.items()}
