"""Extraction: a ``shear`` run's masked model -> a smaller dense :class:`jaxeff.models.Transformer`.

:func:`fold` takes model parameters and masks (mask types of :mod:`jaxeff.prune.hard_concrete`,
values in [0, 1], 0 = pruned), removes every pruned layer, kv group (its query heads, its k/v head
and their rows of ``o``), MLP unit and hidden feature, and multiplies the kept mask values into the
weights, so that the small model computes exactly what the masked model computes:

- hidden value ``z_d``: into the embedding column, every RMSNorm scale (the final norm's only when
  the output projection is not tied to the embedding: with tied embeddings ``z_d`` reaches the
  logits through the embedding), and the output columns (and biases) of ``o`` and ``down``;
- head (kv group) value: into that group's rows of ``o``;
- intermediate value: into that unit's row of ``down``;
- layer value: into ``o`` and ``down`` (kernels and biases) of that layer.

The masked RMSNorm averages over the kept features only, which is what the small model's RMSNorm
does over all of its features. :func:`extract` applies :func:`fold` with the deterministic masks of
a ``shear`` parameter tree (exactly the target architecture); :func:`extract_run` does it for a run
folder and writes a new run (method ``lm``) that every other method can start from
(``train.init_from``) and ``jaxeff eval`` / ``generate`` read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxeff.errors import CheckpointError, JaxeffError


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _kept(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask != 0)


def fold(model_params, model_cfg, masks: dict[str, Any]):
    """``(small_params, small_cfg)``: the dense model equal to ``model_params`` run with ``masks``
    (types ``head [layers, kv_heads]``, ``intermediate [layers, d_ff]``, ``layer [layers]``,
    ``hidden [d_model]``; a missing type keeps everything at 1). Every kept layer must keep the
    same number of kv groups and of MLP units (JaxeffError otherwise). Weights are folded in
    float32 and stored in their original dtypes."""
    m = model_cfg
    L, G, g, hd, ff, d = m.n_layers, m.kv_heads, m.n_heads // m.kv_heads, m.hd, m.ff, m.d_model
    z = {t: np.asarray(_host(v), np.float32) for t, v in masks.items()}
    expected = {"head": (L, G), "intermediate": (L, ff), "layer": (L,), "hidden": (d,)}
    for t, v in z.items():
        if t not in expected:
            raise JaxeffError(f"masks: unknown mask type '{t}' (expected {', '.join(expected)})")
        if v.shape != expected[t]:
            raise JaxeffError(f"masks.{t}: shape {v.shape}, expected {expected[t]} for this model")
    zh = z.get("hidden", np.ones(d, np.float32))
    zl = z.get("layer", np.ones(L, np.float32))
    zg = z.get("head", np.ones((L, G), np.float32))
    zi = z.get("intermediate", np.ones((L, ff), np.float32))
    hid = _kept(zh)
    zhk = zh[hid]
    layers = _kept(zl)
    if len(hid) == 0 or len(layers) == 0:
        raise JaxeffError("masks: every hidden feature or every layer is pruned; nothing to extract")
    n_groups = {int(np.count_nonzero(zg[l])) for l in layers}
    n_units = {int(np.count_nonzero(zi[l])) for l in layers}
    if len(n_groups) != 1 or len(n_units) != 1 or 0 in n_groups or 0 in n_units:
        raise JaxeffError(
            f"masks: kept layers keep {sorted(n_groups)} kv groups and {sorted(n_units)} MLP units; "
            "extraction needs one positive count of each in every kept layer"
        )
    P = jax.tree.map(_host, model_params)
    f32 = lambda a: np.asarray(a, np.float32)
    cast = lambda new, old: np.asarray(new, old.dtype)

    def dense(src, rows, cols, row_scale=None, col_scale=None):
        w = f32(src["kernel"])[rows][:, cols]
        if row_scale is not None:
            w = w * row_scale[:, None]
        out = {"kernel": cast(w if col_scale is None else w * col_scale[None, :], src["kernel"])}
        if "bias" in src:
            b = f32(src["bias"])[cols]
            out["bias"] = cast(b if col_scale is None else b * col_scale, src["bias"])
        return out

    def norm(src, scale=None):
        s = f32(src["scale"])[hid]
        return {"scale": cast(s if scale is None else s * scale, src["scale"])}

    new: dict[str, Any] = {"embed": {"embedding": cast(f32(P["embed"]["embedding"])[:, hid] * zhk, P["embed"]["embedding"])}}
    for j, l in enumerate(layers):
        src = P[f"layers_{l}"]
        groups = _kept(zg[l])
        units = _kept(zi[l])
        heads = (groups[:, None] * g + np.arange(g)).ravel()
        q_cols = (heads[:, None] * hd + np.arange(hd)).ravel()
        kv_cols = (groups[:, None] * hd + np.arange(hd)).ravel()
        head_scale = np.repeat(zg[l][groups], g * hd)  # per row of o
        out_scale = zl[l] * zhk
        a = src["attn"]
        new[f"layers_{j}"] = {
            "attn_norm": norm(src["attn_norm"], zhk),
            "attn": {
                "q": dense(a["q"], hid, q_cols),
                "k": dense(a["k"], hid, kv_cols),
                "v": dense(a["v"], hid, kv_cols),
                "o": dense(a["o"], q_cols, hid, head_scale, out_scale),
            },
            "mlp_norm": norm(src["mlp_norm"], zhk),
            "mlp": {
                "gate": dense(src["mlp"]["gate"], hid, units),
                "up": dense(src["mlp"]["up"], hid, units),
                "down": dense(src["mlp"]["down"], units, hid, zi[l][units], out_scale),
            },
        }
    new["final_norm"] = norm(P["final_norm"], None if m.tie_embeddings else zhk)
    if "lm_head" in P:
        head = P["lm_head"]
        new["lm_head"] = {"kernel": cast(f32(head["kernel"])[hid], head["kernel"])}
        if "bias" in head:
            new["lm_head"]["bias"] = head["bias"]
    windows = m.sliding_window
    if isinstance(windows, tuple):
        windows = tuple(m.windows[l] for l in layers)
    kept_groups, kept_units = n_groups.pop(), n_units.pop()
    small = dataclasses.replace(
        m,
        d_model=len(hid),
        n_layers=len(layers),
        n_heads=kept_groups * g,
        n_kv_heads=None if m.n_kv_heads is None else kept_groups,
        head_dim=hd,
        d_ff=kept_units,
        sliding_window=windows,
    )
    return new, small


def extract(params, model_cfg, prune_cfg):
    """``(small_params, small_cfg)`` of a ``shear`` parameter tree (``{"model", "shear"}``): the
    model with the deterministic masks folded in; its architecture is ``prune.target``."""
    from jaxeff.prune.config import pruned_sizes
    from jaxeff.prune.shear import final_masks

    sizes = pruned_sizes(prune_cfg, model_cfg)
    missing = sorted(set(sizes) - set(params["shear"]["log_alpha"]))
    if missing:
        raise JaxeffError(f"prune.target: prunes {', '.join(missing)} but the parameters have no such masks")
    return fold(params["model"], model_cfg, final_masks(params["shear"], sizes))


# ------------------------------------------------------------------------------------------------
# runs


def extract_run(src, out, step: int | None = None) -> Path:
    """Extract the pruned model of a ``shear`` run (its newest checkpoint, or ``step``) and save it
    as a new run folder ``out`` (method ``lm``, step 0, its own smaller ``model`` section)."""
    from jaxeff.runs import check_new_run, lm_run_config, load_run, read_config, save_model_run
    from jaxeff.train.checkpoint import find_checkpoint_dir

    out = Path(out)
    saved = read_config(src, step)
    if saved.get("method") != "shear":
        raise CheckpointError(f"checkpoint '{find_checkpoint_dir(src)}' is a '{saved.get('method', 'lm')}' run; expected a shear run")
    check_new_run(out)
    cfg, _, params = load_run(src, step)
    small_params, small_cfg = extract(params, cfg.model, cfg.prune)
    from pydantic import TypeAdapter

    from jaxeff.models.config import TransformerConfig

    model_dict = TypeAdapter(TransformerConfig).dump_python(small_cfg, mode="json")
    saved.pop("prune", None)  # the new run is a plain model: default prune section
    out_cfg = lm_run_config(saved, out, model=model_dict)
    provenance = {
        "command": "jaxeff extract",
        "source": str(Path(src).absolute()),
        "method": "shear",
        "step": step if step is not None else "latest",
        "data": "as the source run",
    }
    save_model_run(jax.device_put(small_params, jax.devices()[0]), out_cfg, provenance=provenance)
    return out


__all__ = ["fold", "extract", "extract_run"]
