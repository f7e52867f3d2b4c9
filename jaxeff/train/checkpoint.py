"""orbax checkpoints: train state + data-loader position + the resolved config, in one step folder.

orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step that ``latest_step`` would pick up. The saved config lets ``eval`` and
``generate`` rebuild the model from the checkpoint alone and lets a resume refuse a checkpoint of
a different model with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import flax.struct
import jax
import orbax.checkpoint as ocp

from jaxeff.errors import CheckpointError, DamagedCheckpoint, DiskFullError

# orbax reports a failed write or read from its worker threads through absl/orbax logging (with
# tracebacks) before the same error reaches us; we turn those into one line each, so silence them.
# asyncio's "Task exception was never retrieved" is the same: the abandoned reads' tasks, logged when
# garbage-collected (jaxeff runs no asyncio code of its own).
for _name in ("absl", "orbax", "asyncio"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)
# ... and so is Python's warning about their coroutines that never ran, at garbage collection
warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)

CHECKSUMS = "jaxeff_checksums.json"  # per-file CRC32 of a step folder, written after orbax commits it
_CHUNK = 1 << 22


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(CHECKSUMS))


# When a read fails part-way, orbax abandons its asyncio loop while TensorStore still completes the
# other reads; each late completion prints "RuntimeError: Event loop is closed" with a traceback
# from native code (hundreds of lines, nothing Python can catch). Reads run with stderr filtered.
_LOOP_NOISE = re.compile(
    r"Traceback \(most recent call last\):|File \"[^\"\n]*asyncio[^\"\n]*\", line \d+, in \w+|"
    r"self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|"
    r"RuntimeError: Event loop is closed|RuntimeError:|Event loop is closed"
)


def _strip_loop_noise(text: str) -> str:
    """``text`` without the noise's fragments (threads interleave them, even inside other lines);
    a line that held any is stripped, and lines left empty go."""
    out = []
    for line in text.splitlines():
        cleaned = _LOOP_NOISE.sub("", line)
        if cleaned != line:
            cleaned = cleaned.strip()
        if cleaned.strip():
            out.append(cleaned)
    return "\n".join(out) + ("\n" if out else "")


@contextlib.contextmanager
def _without_loop_noise():
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if failed:  # the abandoned reads complete late: wait until stderr has been quiet for 0.5 s (3 s at most)
                quiet_since, size, start = time.monotonic(), -1, time.monotonic()
                while time.monotonic() - start < 3.0:
                    time.sleep(0.1)
                    now = os.fstat(tmp.fileno()).st_size
                    if now != size:
                        size, quiet_since = now, time.monotonic()
                    elif time.monotonic() - quiet_since >= 0.5:
                        break
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            # a failed read is reported by the caller in one line: what its threads printed (the
            # noise, interleaved down to single characters) goes; after a good read, only the noise
            rest = "" if failed else _strip_loop_noise(tmp.read().decode(errors="replace"))
            if rest.strip():
                sys.stderr.write(rest)
                sys.stderr.flush()


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "os_error_code='28'" in text


class Checkpointer:
    """orbax's CheckpointManager for one run's ``checkpoints/`` folder; a context manager
    (``with Checkpointer(...) as ckpt:``) that closes the manager on exit."""

    def __init__(self, directory: str | Path, *, keep: int = 3, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory '{directory}' does not exist")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, step: int, state, *, data_state: dict, config: dict) -> None:
        """Write step ``step`` and then its checksums file. A full disk raises :class:`DiskFullError`
        (one line) after removing the partial write; the checkpoints already written stay intact."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({"config": config}))
        try:
            with _without_loop_noise():
                self._mngr.save(step, args=args, force=True)
                self._mngr.wait_until_finished()
            self._write_checksums(step)
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in ValueError and others
            self._remove_partial(step)
            if _is_disk_full(e):
                raise DiskFullError(
                    f"checkpoint step {step}: no space left on '{self.directory}' (the previous checkpoints {self.all_steps()} are intact)"
                ) from None
            raise CheckpointError(f"checkpoint step {step} could not be written to '{self.directory}': {first_line(e)}") from None

    def _write_checksums(self, step: int) -> None:
        step_dir = self.directory / str(step)
        if jax.process_index() == 0:
            sums = {str(p.relative_to(step_dir)): _crc32(p) for p in _files(step_dir)}
            tmp = step_dir / f"{CHECKSUMS}.tmp"
            tmp.write_text(json.dumps({"crc32": sums}, indent=0))
            os.replace(tmp, step_dir / CHECKSUMS)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxeff:checksums:{step}")

    def _remove_partial(self, step: int) -> None:
        """After a failed save: orbax's temporary folder of ``step`` (and the step folder itself when it
        was committed but its checksums could not be written) go, so the disk space comes back."""
        if jax.process_index() != 0:
            return
        for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        committed = self.directory / str(step)
        if committed.is_dir() and not (committed / CHECKSUMS).exists():
            shutil.rmtree(committed, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._mngr.reload()

    def verify(self, step: int) -> str | None:
        """Why step ``step`` is damaged (a file missing, or its CRC32 differs from the one written when
        it was saved), or None when every file checks out. A step saved before checksums existed (or
        killed between orbax's commit and the checksums file) has none to check: None."""
        step_dir = self.directory / str(step)
        try:
            sums = json.loads((step_dir / CHECKSUMS).read_text())["crc32"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its checksums file is unreadable ({first_line(e)})"
        for rel, crc in sums.items():
            path = step_dir / rel
            if not path.is_file():
                return f"file {rel} is missing"
            if _crc32(path) != crc:
                return f"file {rel} does not match its checksum (corrupted on disk)"
        return None

    def check_intact(self, step: int) -> None:
        damage = self.verify(step)
        if damage:
            raise DamagedCheckpoint(f"checkpoint '{self.directory}' step {step} is damaged: {damage}")

    def has_checksums(self, step: int) -> bool:
        return (self.directory / str(step) / CHECKSUMS).is_file()

    def read_config(self, step: int | None = None) -> dict:
        step = self._resolve(step)
        with _without_loop_noise():
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return meta["config"]

    def restore(self, abstract_state, step: int | None = None, *, verify: bool = True) -> tuple[Any, dict]:
        """Restore onto the shardings of ``abstract_state`` (a tree of ShapeDtypeStruct), after checking
        the step's files against their checksums (:class:`DamagedCheckpoint` when they differ) unless
        the caller did with :meth:`verify`."""
        step = self._resolve(step)
        if verify:
            self.check_intact(step)
        try:
            with _without_loop_noise():
                out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            for key in (None, *LEGACY_MODEL_KEYS):  # a checkpoint in an earlier layout, when it is one
                legacy = self._restore_legacy(abstract_state, step, key)
                if legacy is not None:
                    return legacy
            raise CheckpointError(f"checkpoint '{self.directory}' step {step} could not be restored for this run: {first_line(e)}") from None
        return out["state"], out["data"]

    def _restore_legacy(self, abstract_state, step: int, model_key: str | None):
        """A train state written before ``TrainState.extra`` was dropped (jaxeff 2026-12; it was always
        empty) and, with ``model_key``, before the prepared tree's ``"model"`` key was called that
        (``"base"``: lora/qlora, ``"student"``: distill): restored in that layout, returned in today's.
        None when that does not fit either."""
        from jaxeff.train.step import TrainState

        if not isinstance(abstract_state, TrainState):
            return None
        fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
        if model_key is not None:
            if not _has_model_key(fields["params"]):
                return None
            fields = _renamed(fields, MODEL_KEY, model_key)
        variants = [_StateWithExtra(**fields, extra={})] + ([TrainState(**fields)] if model_key else [])
        for target in variants:
            try:
                with _without_loop_noise():
                    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            except (ValueError, KeyError, TypeError):
                continue
            restored = {name: getattr(out["state"], name) for name in fields}
            if model_key is not None:
                restored = _renamed(restored, model_key, MODEL_KEY)
            return TrainState(**restored), out["data"]
        return None

    def restore_raw(self, step: int) -> None:
        """Read step ``step`` with its own on-disk structure (no target); raises when it cannot be read
        at all. Tells a damaged checkpoint from one that does not fit this run's train state."""
        with _without_loop_noise():
            self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the ``params`` of a saved train state (whatever method wrote it); the step's files are
        checked against their checksums first."""
        step = self._resolve(step)
        self.check_intact(step)
        params, error = self._restore_params_as(abstract_params, step)
        if (error is not None or _missing_leaf(params)) and _has_model_key(abstract_params):
            for key in LEGACY_MODEL_KEYS:  # written before the prepared tree's "model" key was called that
                legacy, _ = self._restore_params_as(_renamed(abstract_params, MODEL_KEY, key), step)
                if legacy is not None and not _missing_leaf(legacy):
                    params, error = _renamed(legacy, key, MODEL_KEY), None
                    break
        if error is not None:
            raise CheckpointError(f"checkpoint '{self.directory}' step {step}: parameters do not match: {first_line(error)}") from None
        # partial_restore leaves a parameter the checkpoint lacks as its ShapeDtypeStruct: refuse by name
        # (e.g. a run whose method stores its parameters under another structure, such as ttt_e2e's)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise CheckpointError(
                    f"checkpoint '{self.directory}' step {step}: has no parameter '{name}' (a run of a method that stores its parameters differently?)"
                )
        return params

    def _restore_params_as(self, abstract_params, step: int):
        args = ocp.args.PyTreeRestore(
            item={"params": abstract_params}, partial_restore=True, restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)}
        )
        try:
            with _without_loop_noise():
                return self._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"], None
        except (ValueError, KeyError, TypeError) as e:
            return None, e

    def quarantined(self) -> list[str]:
        """Names of the step folders moved aside as unreadable (``<step>.unreadable``)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if ".unreadable" in p.name)

    def quarantine(self, step: int) -> Path:
        """Move an unreadable step folder aside (``<step>.unreadable``) so a resumed run can write
        that step again; nothing is deleted."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.unreadable{n}"
        if jax.process_index() == 0:
            src.rename(dst)
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxeff:quarantine:{step}")
        self._mngr.reload()
        return dst

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"checkpoint directory '{self.directory}' holds no complete checkpoint")
        elif step not in self.all_steps():
            raise CheckpointError(f"checkpoint directory '{self.directory}' has no step {step} (has {self.all_steps()})")
        return step

    def close(self):
        self._mngr.close()


def first_line(e: BaseException) -> str:
    """The first line of an error's message, without TensorStore's '<bound method ...>' tail."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(" See full TensorStore details")[0].rstrip(" .:")[:300]


ONE_DEVICE = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "optim.grad_accum": 1}


def one_device_config(saved: dict, **changes):
    """The :class:`~jaxeff.config.ExperimentConfig` of a saved run set up for one device (mesh
    1x1x1, no gradient accumulation), with dotted ``changes``: how tools that read a run (eval,
    generate, extract, merge, convert, ...) rebuild it."""
    from jaxeff.config import from_dict, with_overrides

    return from_dict(with_overrides(saved, {**ONE_DEVICE, **changes}))


def new_lm_run(out: Path) -> dict:
    """Dotted changes that make a saved run's config that of a fresh plain ``lm`` run in folder
    ``out`` (for tools that write a new run: merge, extract, sparsify, ...)."""
    return {"name": out.name, "logging.run_dir": str(out.parent), "checkpoint.dir": None, "method": "lm", "train.init_from": None, "resume": False}


def open_new_run(cfg, out: Path, key: str = "--out") -> "Checkpointer":
    """The checkpointer of the new run ``cfg`` (in folder ``out``), refused with one line naming
    ``key`` when that folder already holds a checkpoint. The caller closes it."""
    ckpt = Checkpointer(cfg.checkpoint_path)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise CheckpointError(f"{key}: '{out}' already holds a checkpoint; choose another folder")
    return ckpt


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run folder (``runs/<name>``) or its ``checkpoints`` folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint directory '{path}' does not exist")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    return p


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted path of the first differing entry between two JSON-like trees (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return sub
            d = first_difference(a[key], b[key], sub)
            if d:
                return d
        return None
    norm = lambda v: json.loads(json.dumps(v))  # tuples vs lists
    return None if norm(a) == norm(b) else prefix or "<root>"


MODEL_KEY = "model"  # the key of the model's parameters in a method's prepared tree
LEGACY_MODEL_KEYS = ("base", "student")  # its names before 2026-12 (lora/qlora, distill)


def _has_model_key(tree) -> bool:
    return isinstance(tree, dict) and MODEL_KEY in tree


def _missing_leaf(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _renamed(tree, old: str, new: str):
    """``tree`` with every mapping key ``old`` renamed ``new`` (through dicts, tuples, named tuples
    and dataclasses such as optimizer states), leaves untouched."""
    if isinstance(tree, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_renamed(v, old, new) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_renamed(v, old, new) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _renamed(getattr(tree, f.name), old, new) for f in dataclasses.fields(tree) if f.init})
    return tree


@flax.struct.dataclass
class _StateWithExtra:
    """The train state's layout before ``extra`` was dropped (for :meth:`Checkpointer.restore`)."""

    step: Any
    params: Any
    opt_state: Any
    extra: Any
    rng: Any
    skipped: Any
    bad_streak: Any
    halted_at: Any


# settings that change how a model runs, not which parameters it has
RUNTIME_ONLY = ("attention_impl", "remat", "dropout", "dtype")


def _with_defaults(model: dict) -> dict:
    """A saved model section with the defaults of fields added since it was written."""
    from pydantic import TypeAdapter, ValidationError

    from jaxeff.models.config import TransformerConfig

    try:
        adapter = TypeAdapter(TransformerConfig)
        return adapter.dump_python(adapter.validate_python(model), mode="json")
    except ValidationError:
        return model


def check_same_model(saved_config: dict, model_config: dict, where: Path) -> None:
    saved = {k: v for k, v in _with_defaults(saved_config.get("model", {})).items() if k not in RUNTIME_ONLY}
    diff = first_difference(saved, {k: v for k, v in model_config.items() if k not in RUNTIME_ONLY})
    if diff:

        def get(tree, dotted):
            for k in dotted.split("."):
                tree = tree.get(k, "<absent>") if isinstance(tree, dict) else "<absent>"
            return tree

        raise CheckpointError(
            f"checkpoint '{where}' is from a different model: model.{diff} is "
            f"{get(saved_config.get('model', {}), diff)!r} there but {get(model_config, diff)!r} here"
        )


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
