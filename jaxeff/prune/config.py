"""The `prune` config section (method ``shear``: Sheared-LLaMA structured pruning).

``target`` is the architecture the pruned model must have; a field left at ``null`` keeps the
source model's size (that kind of mask is not created). The source is the run's ``model`` section.
"""

from __future__ import annotations

from pydantic import Field

from jaxeff.errors import ConfigError
from jaxeff.schema import Section


class PruneTarget(Section):
    """Target architecture (``null`` = as the source model)."""

    d_model: int | None = Field(None, gt=0)  # hidden size (the hidden mask)
    n_heads: int | None = Field(None, gt=0)  # query heads per layer (head mask; GQA: whole kv groups)
    n_layers: int | None = Field(None, gt=0)  # layers (one layer mask on attention and MLP outputs)
    d_ff: int | None = Field(None, gt=0)  # MLP intermediate units per layer (intermediate mask)


class PruneConfig(Section):
    target: PruneTarget = Field(default_factory=PruneTarget)
    # hard-concrete masks: log α ~ N(log_alpha_init, log_alpha_init_std), clamped to
    # [ln 0.01, ln 100] = [-4.6, 4.6] after every update (so the reference's 5 becomes 4.6 at once)
    log_alpha_init: float = 5.0
    log_alpha_init_std: float = Field(0.01, ge=0.0)
    mask_lr: float = Field(1.0, gt=0.0)  # adam on log α (the reference: 1.0)
    lambda_lr: float = Field(1.0, gt=0.0)  # adam gradient ASCENT on λ1, λ2 (the reference: 1.0)
    # the target sparsity grows linearly from 0 over this fraction of train.steps, then stays
    warmup_fraction: float = Field(0.2, ge=0.0, le=1.0)
    train_model: bool = True  # false: only log α and λ are trained, the model weights stay fixed


MASK_TYPES = ("head", "intermediate", "layer", "hidden")


def pruned_sizes(prune: PruneConfig, model) -> dict[str, tuple[int, int]]:
    """``{mask type: (source count, target count)}`` for each mask type that prunes something
    (per row: heads as kv groups per layer, units per layer, layers, hidden features).

    Raises ConfigError (naming the ``prune.target`` field) for a target above the source, a head
    target that is not whole kv groups, or a target equal to the source everywhere."""
    t = prune.target
    group = model.n_heads // model.kv_heads
    checks = [
        ("d_model", t.d_model, model.d_model),
        ("n_heads", t.n_heads, model.n_heads),
        ("n_layers", t.n_layers, model.n_layers),
        ("d_ff", t.d_ff, model.ff),
    ]
    for name, tgt, src in checks:
        if tgt is not None and tgt > src:
            raise ConfigError(f"prune.target.{name}: {tgt} is larger than the source model's {src} (model.{name})")
    out = {}
    if t.n_heads is not None and t.n_heads < model.n_heads:
        if t.n_heads % group:
            raise ConfigError(
                f"prune.target.n_heads: {t.n_heads} is not a multiple of the {group} query heads per "
                f"kv head (model.n_heads={model.n_heads}, n_kv_heads={model.kv_heads}); GQA prunes "
                "whole kv groups"
            )
        out["head"] = (model.kv_heads, t.n_heads // group)
    if t.d_ff is not None and t.d_ff < model.ff:
        out["intermediate"] = (model.ff, t.d_ff)
    if t.n_layers is not None and t.n_layers < model.n_layers:
        out["layer"] = (model.n_layers, t.n_layers)
    if t.d_model is not None and t.d_model < model.d_model:
        out["hidden"] = (model.d_model, t.d_model)
    if not out:
        raise ConfigError("prune.target: equals the source model (set at least one of d_model, n_heads, n_layers, d_ff below the model's size)")
    return out


def check_prune(cfg) -> dict[str, tuple[int, int]]:
    """Cross-field checks of a ``shear`` experiment config (``prune`` against ``model``); returns
    :func:`pruned_sizes`."""
    return pruned_sizes(cfg.prune, cfg.model)
