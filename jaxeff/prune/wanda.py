"""Unstructured and N:M pruning of the block projections: magnitude and Wanda (Sun et al., 2024).

Every projection is a Dense kernel ``W [in, out]``. Scores, one per weight:

* magnitude: ``|W_ij|``;
* Wanda: ``|W_ij| * ||X_i||_2``, where ``X_i`` is input feature ``i`` of that layer over all
  calibration tokens (padding left out), i.e. the L2 norm over tokens of the Dense's input.

The lowest scores are pruned **per output unit** (per column ``j`` of our ``[in, out]`` kernel; a
"row" of PyTorch's ``[out, in]`` weight), never globally across the layer:

* ``sparsity=s``: exactly ``floor(s * in)`` weights of every column become 0 (ties broken by the
  lower input index first, as the reference's stable sort does);
* ``nm=(n, m)``: in every group of ``m`` consecutive input features of a column, the ``m - n``
  lowest scores become 0 (``n`` of every ``m`` kept; 2:4 keeps half).

Pruned only: ``layers_<i>/attn/{q,k,v,o}`` and ``layers_<i>/mlp/{gate,up,down}`` (the block
projections, :data:`TARGETS`). The embedding / tied ``lm_head``, norms and biases are left
untouched, as in Wanda.

As in the reference code (``lib/prune.py``, ``prune_wanda``), calibration is sequential by default:
the input norms of block ``i`` are measured with blocks ``0..i-1`` already pruned, and all seven
projections of block ``i`` take their norms from one forward pass before any of them is pruned.

    norms = input_norms(model, params, batches)                 # {path: ||X||_2 [in]}
    pruned, report = prune(params, method="wanda", sparsity=0.5, norms=norms)
    pruned, report = wanda(model, params, batches, nm=(2, 4))    # sequential calibration
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import ConfigError
from jaxeff.dense import intercept_dense
from jaxeff.quant.intercept import get_path, set_path
from jaxeff.targets import BLOCK_PROJECTIONS, select

# the attention and MLP projections of every block (jaxeff.targets.BLOCK_PROJECTIONS as one whole-path rule)
TARGETS = "|".join(f"(?:{rule})" for rule in BLOCK_PROJECTIONS)
METHODS = ("magnitude", "wanda")


# ------------------------------------------------------------------------------------------------
# arguments


def check_sparsity(sparsity, field: str = "sparsity") -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected a number in [0, 1) (got {sparsity!r})") from None
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"{field}: expected a number in [0, 1) (got {sparsity})")
    return s


def parse_nm(nm, field: str = "nm") -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs, ``1 <= n <= m``."""
    if isinstance(nm, str):
        parts = nm.split(":")
        try:
            n, m = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            n, m = None, None
        if n is None:
            raise ConfigError(f"{field}: expected N:M such as 2:4 (got {nm!r})")
    else:
        n, m = nm
    if m < 1 or n < 1:
        raise ConfigError(f"{field}: N and M must be positive (got {n}:{m})")
    if n > m:
        raise ConfigError(f"{field}: N must not exceed M (got {n}:{m}; N is the number kept of every M)")
    return int(n), int(m)


# ------------------------------------------------------------------------------------------------
# scores and masks (pure functions of one kernel)


def magnitude_scores(kernel: jax.Array) -> jax.Array:
    """``|W|`` ``[in, out]`` in float32."""
    return jnp.abs(kernel.astype(jnp.float32))


def wanda_scores(kernel: jax.Array, input_norm: jax.Array) -> jax.Array:
    """``|W_ij| * ||X_i||_2`` ``[in, out]``: ``input_norm [in]`` is the L2 norm over calibration
    tokens of each input feature."""
    if input_norm.shape != kernel.shape[:1]:
        raise ValueError(f"wanda_scores: input_norm {input_norm.shape} does not match kernel {kernel.shape} [in, out]")
    return jnp.abs(kernel.astype(jnp.float32)) * input_norm.astype(jnp.float32)[:, None]


def _ranks(scores: jax.Array, axis: int) -> jax.Array:
    """Rank of each score along ``axis`` (0 = lowest); equal scores: lower index first."""
    order = jnp.argsort(scores, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def keep_mask(scores: jax.Array, *, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> jax.Array:
    """Boolean ``[in, out]``: True where the weight is kept. Exactly one of ``sparsity`` (prune
    ``floor(sparsity * in)`` lowest scores of every column) and ``nm`` (keep the ``n`` highest of
    every ``m`` consecutive inputs of every column)."""
    if (sparsity is None) == (nm is None):
        raise ConfigError("prune: give exactly one of sparsity and nm")
    d_in, d_out = scores.shape
    if nm is None:
        k = int(np.floor(check_sparsity(sparsity) * d_in + 1e-9))
        return _ranks(scores, 0) >= k
    n, m = parse_nm(nm)
    if d_in % m:
        raise ConfigError(f"nm: M={m} does not divide the kernel's {d_in} input features")
    grouped = scores.reshape(d_in // m, m, d_out)
    return (_ranks(grouped, 1) >= m - n).reshape(d_in, d_out)


# ------------------------------------------------------------------------------------------------
# calibration


def target_paths(params, pattern=TARGETS) -> list[str]:
    """The Dense layers a rule (or rules) selects (:func:`jaxeff.targets.select`); ConfigError if none."""
    return select(params, pattern, "prune targets", required=True)


def _batch_fields(batch) -> tuple[Any, dict[str, Any], Any]:
    """``(tokens, model kwargs, mask [batch, seq])`` from a packed batch or a plain token array."""
    if isinstance(batch, Mapping):
        seg = jnp.asarray(batch["segment_ids"])
        kw = {"positions": jnp.asarray(batch["positions"]), "segment_ids": seg}
        return jnp.asarray(batch["inputs"]), kw, (seg > 0).astype(jnp.float32)
    tokens = jnp.asarray(batch)
    return tokens, {}, jnp.ones(tokens.shape, jnp.float32)


def input_sq_sums(model, params, tokens, mask, paths: Iterable[str], **kwargs) -> dict[str, jax.Array]:
    """``sum over tokens of x_i^2`` ``[in]`` of the input of each Dense in ``paths`` (tokens where
    ``mask`` is 0 left out), for one batch."""

    def sq_sum(x):
        xf = x.astype(jnp.float32)
        return jnp.einsum("bti,bt->i", xf * xf, mask)

    with intercept_dense(observe={p: sq_sum for p in paths}) as seen:
        model.apply({"params": params}, tokens, **kwargs)
    return seen


_sq_sums_jit = jax.jit(input_sq_sums, static_argnames=("model", "paths"))


def input_norms(model, params, batches: Iterable, paths: Iterable[str] | None = None) -> dict[str, jax.Array]:
    """``{path: ||X||_2 [in]}``: per input feature, the L2 norm over every (non-padding) token of
    ``batches`` (packed batches with ``inputs/positions/segment_ids``, or ``[batch, seq]`` token arrays)."""
    paths = tuple(paths if paths is not None else target_paths(params))
    total: dict[str, jax.Array] = {}
    n = 0
    for batch in batches:
        tokens, kw, mask = _batch_fields(batch)
        sums = _sq_sums_jit(model, params, tokens, mask, paths, **kw)
        total = {p: total.get(p, 0.0) + sums[p] for p in paths}
        n += 1
    if n == 0:
        raise ConfigError("calib_batches: Wanda needs at least one calibration batch")
    return {p: jnp.sqrt(v) for p, v in total.items()}


# ------------------------------------------------------------------------------------------------
# pruning a parameter tree


def _prune_paths(params, paths, method, sparsity, nm, norms):
    out = params
    for path in paths:
        kernel = get_path(params, path)["kernel"]
        if method == "magnitude":
            scores = magnitude_scores(kernel)
        else:
            if norms is None or path not in norms:
                raise ValueError(f"prune: method 'wanda' needs the input norm of '{path}'")
            scores = wanda_scores(kernel, norms[path])
        mask = keep_mask(scores, sparsity=sparsity, nm=nm)
        node = dict(get_path(params, path))
        node["kernel"] = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
        out = set_path(out, path, node)
    return out


def _check_method(method, sparsity, nm):
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)} (got {method!r})")
    if (sparsity is None) == (nm is None):
        raise ConfigError("sparsity / nm: give exactly one (e.g. sparsity=0.5 or nm='2:4')")
    return (check_sparsity(sparsity) if sparsity is not None else None), (parse_nm(nm) if nm is not None else None)


def prune(
    params, *, method: str, sparsity: float | None = None, nm=None, norms: Mapping[str, jax.Array] | None = None, pattern: str = TARGETS
) -> tuple[Any, dict[str, Any]]:
    """One-shot pruning with given ``norms`` (Wanda) or none (magnitude): ``(pruned params, report)``.
    Parameters that are not targeted are the same arrays as in ``params``."""
    sparsity, nm = _check_method(method, sparsity, nm)
    paths = target_paths(params, pattern)
    pruned = _prune_paths(params, paths, method, sparsity, nm, norms)
    return pruned, sparsity_report(pruned, paths)


def wanda(
    model, params, batches, *, sparsity: float | None = None, nm=None, sequential: bool = True, pattern: str = TARGETS
) -> tuple[Any, dict[str, Any]]:
    """Wanda with calibration ``batches`` (a list, reused once per block when ``sequential``)."""
    sparsity, nm = _check_method("wanda", sparsity, nm)
    paths = target_paths(params, pattern)
    batches = list(batches)
    if not sequential:
        norms = input_norms(model, params, batches, paths)
        pruned = _prune_paths(params, paths, "wanda", sparsity, nm, norms)
        return pruned, sparsity_report(pruned, paths)
    blocks: dict[str, list[str]] = {}
    for p in paths:
        blocks.setdefault(p.split("/")[0], []).append(p)
    pruned = params
    for block in sorted(blocks, key=lambda b: int(b.split("_")[-1]) if b.split("_")[-1].isdigit() else 0):
        norms = input_norms(model, pruned, batches, blocks[block])
        pruned = _prune_paths(pruned, blocks[block], "wanda", sparsity, nm, norms)
    return pruned, sparsity_report(pruned, paths)


def output_error(model, dense, pruned, tokens, paths: Iterable[str] | None = None) -> dict[str, float]:
    """``{path: ||X (W - W_pruned)||_F / ||X W||_F}``: each pruned layer's relative output error on
    the inputs ``X`` it receives in the dense model for ``tokens [batch, seq]`` (what Wanda's score
    approximates per weight)."""
    from jaxeff.quant.ptq import collect_dense_inputs

    paths = list(paths if paths is not None else target_paths(dense))
    xs = collect_dense_inputs(model, dense, tokens, [re.escape(p) for p in paths], "prune targets")
    out = {}
    for p in paths:
        x = xs[p].astype(jnp.float32).reshape(-1, xs[p].shape[-1])
        w, w_p = get_path(dense, p)["kernel"].astype(jnp.float32), get_path(pruned, p)["kernel"].astype(jnp.float32)
        out[p] = float(jnp.linalg.norm(x @ (w - w_p)) / jnp.linalg.norm(x @ w))
    return out


def sparsity_report(params, paths: Iterable[str]) -> dict[str, Any]:
    """Share of exact zeros in each pruned kernel, over all of them, and over the whole model."""
    per_layer, zeros, size = {}, 0, 0
    for p in paths:
        k = np.asarray(jax.device_get(get_path(params, p)["kernel"]))
        z = int(np.sum(k == 0))
        per_layer[p] = z / k.size
        zeros, size = zeros + z, size + k.size
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {
        "layers": per_layer,
        "pruned_sparsity": zeros / max(size, 1),
        "model_sparsity": zeros / max(total, 1),
        "pruned_params": size,
        "model_params": total,
    }


# ------------------------------------------------------------------------------------------------
# run folders (the CLI)


def sparsify_run(
    run,
    out,
    *,
    method: str,
    sparsity: float | None = None,
    nm=None,
    calib_batches: int = 8,
    step: int | None = None,
    evaluate: bool = True,
    return_params: bool = False,
):
    """Prune a run's model parameters and save them as a new run folder ``out`` (method ``lm``,
    step 0) that ``jaxeff eval`` / ``generate`` / ``train.init_from`` read like any other run.
    Calibration batches are the first ``calib_batches`` training batches of the run's data section.
    Writes ``out/sparsify.json`` (settings, per-layer sparsity, eval losses) and returns that record
    (with ``return_params``: ``(record, dense params, pruned params)``)."""
    import json
    from pathlib import Path

    from jaxeff.runs import check_new_run, lm_run_config, load_model_params, save_model_run
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir
    from jaxeff.train.inputs import build_data
    from jaxeff.train.runtime import Trainer

    sparsity, nm = _check_method(method, sparsity, nm)
    if method == "wanda" and calib_batches < 1:
        raise ConfigError(f"calib_batches: Wanda needs at least one calibration batch (got {calib_batches})")
    out = Path(out)
    src_dir = find_checkpoint_dir(run)
    with Checkpointer(src_dir, create=False) as ckpt:
        saved = ckpt.read_config(step)
        src_step = step if step is not None else ckpt.latest_step()
    cfg = lm_run_config(saved, out)
    check_new_run(out)
    _, params = load_model_params(src_dir, src_step)  # any method's run: its model parameters (LoRA merged, ...)
    trainer = Trainer(cfg, devices=jax.devices()[:1])  # a plain lm run: calibration and evaluation
    _, loader, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    if method == "wanda":
        batches = [loader.next_batch() for _ in range(calib_batches)]
        pruned, report = wanda(trainer.model, params, batches, sparsity=sparsity, nm=nm)
    else:
        pruned, report = prune(params, method="magnitude", sparsity=sparsity, nm=nm)
    record = {
        "source": str(Path(run).absolute()),
        "source_step": src_step,
        "method": method,
        "sparsity": sparsity,
        "nm": f"{nm[0]}:{nm[1]}" if nm else None,
        "calib_batches": calib_batches if method == "wanda" else 0,
        **report,
    }
    if evaluate:
        record["eval_before"] = trainer.evaluate(params, eval_sets, cfg.train.eval_batches)
        record["eval_after"] = trainer.evaluate(pruned, eval_sets, cfg.train.eval_batches)
    save_model_run(
        pruned,
        cfg,
        provenance={
            "command": "jaxeff sparsify",
            "source": record["source"],
            "step": src_step,
            "method": saved.get("method", "lm"),
            "sparsify": method,
            "data": "as the source run",
        },
    )
    (cfg.run_path / "sparsify.json").write_text(json.dumps(record, indent=1))
    return (record, params, pruned) if return_params else record


__all__ = [
    "TARGETS",
    "METHODS",
    "check_sparsity",
    "parse_nm",
    "magnitude_scores",
    "wanda_scores",
    "keep_mask",
    "target_paths",
    "input_sq_sums",
    "input_norms",
    "prune",
    "wanda",
    "sparsity_report",
    "output_error",
    "sparsify_run",
]
