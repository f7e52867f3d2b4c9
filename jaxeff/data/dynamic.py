"""Dynamic batch loading (Sheared-LLaMA): domain weights follow where the model lags its reference losses.

Every ``every`` steps the trainer measures the per-domain eval losses ``l`` and moves the mixture
weights ``w`` of the :class:`~jaxeff.data.loader.MixtureLoader` towards the domains whose loss is
furthest above its reference ``l_ref``:

    delta   = l - l_ref                  (clamped at 0 when ``clamp``: the paper's max(l - l_ref, 0))
    alpha_i = w_i * exp(delta_i) / sum_j w_j * exp(delta_j)     (= softmax(log w + delta))
    w'      = (1 - c) * alpha + c / k    (c = ``smoothing``, k = number of domains)

The paper (Xia et al., 2023) writes the clamp; the released code (LLM-Shearing) does not clamp and
smooths with c = 1e-4, so both are switches here. The reference losses are given per domain
(``reference_losses``) or measured once at the start of training by evaluating the model of another
run (``reference_run``, e.g. the source model before pruning) on this run's eval sets.

The weights live in the loader's state, which every checkpoint carries; a resumed run continues with
the weights it had. The loader draws each row's domain from the weights and serves each domain's rows
in a fresh permutation per epoch, so changing the weights never makes a row repeat within its epoch.

Pure numpy at import; imported by ``jaxeff.config`` (so it imports neither jax nor ``jaxeff.config``
at module level). ``reference_losses`` and ``update_mixture`` are the trainer's side of it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from jaxeff.errors import ConfigError
from jaxeff.schema import Section

__all__ = ["DynamicBatchConfig", "update_weights", "deltas", "check_reference_domains", "reference_losses", "update_mixture"]


class DynamicBatchConfig(Section):
    """``data.dynamic``: re-weight the training mixture from per-domain eval losses."""

    enabled: bool = False
    # steps between weight updates; None = every train.eval_every steps (the update reuses that evaluation)
    every: int | None = Field(None, gt=0)
    # per-domain reference losses (nats/token), one for every domain of the run ...
    reference_losses: dict[str, float] | None = None
    # ... or a run / checkpoint folder whose model (trained with plain parameters) is evaluated on this
    # run's eval sets at the start of training to give them
    reference_run: str | None = None
    clamp: bool = True  # delta = max(l - l_ref, 0) (paper); false = l - l_ref (released code)
    smoothing: float = Field(1e-4, ge=0.0, le=1.0)  # c: w <- (1 - c) w + c / k

    @field_validator("reference_losses")
    @classmethod
    def _finite(cls, v):
        if v is not None:
            for k, x in v.items():
                if not math.isfinite(x):
                    raise ValueError(f"reference loss of '{k}' must be a finite number (got {x})")
        return v

    @model_validator(mode="after")
    def _one_reference(self):
        if self.enabled and (self.reference_losses is None) == (self.reference_run is None):
            raise ValueError(
                "enabled: needs exactly one of reference_losses (per domain) or reference_run "
                "(a run folder to measure them from), got " + ("both" if self.reference_losses is not None else "neither")
            )
        return self


def check_reference_domains(reference: Mapping[str, float], domains: Sequence[str], field: str) -> None:
    """One ConfigError naming ``field`` unless ``reference`` has exactly the run's ``domains``."""
    unknown = [k for k in reference if k not in domains]
    if unknown:
        raise ConfigError(f"{field}: unknown domain(s) {', '.join(map(repr, unknown))} (this run's domains: {', '.join(domains)})")
    missing = [d for d in domains if d not in reference]
    if missing:
        raise ConfigError(f"{field}: no reference loss for domain(s) {', '.join(map(repr, missing))} (every domain of the run needs one)")


def _deltas(losses: np.ndarray, reference: np.ndarray, clamp: bool) -> np.ndarray:
    d = losses - reference
    return np.maximum(d, 0.0) if clamp else d


def update_weights(weights, losses, reference, *, clamp: bool = True, smoothing: float = 1e-4):
    """One dynamic-batch-loading update (see the module docstring).

    ``weights``, ``losses``, ``reference``: either three sequences in the same domain order (returns a
    float64 array) or three mappings by domain name (returns a dict in ``weights``' order; ``losses`` and
    ``reference`` must have every key of ``weights``). Weights need not be normalised; a zero weight
    stays zero unless ``smoothing`` > 0."""
    if isinstance(weights, Mapping):
        names = list(weights)
        new = update_weights([weights[n] for n in names], [losses[n] for n in names], [reference[n] for n in names], clamp=clamp, smoothing=smoothing)
        return {n: float(x) for n, x in zip(names, new)}
    w = np.asarray(weights, np.float64)
    d = _deltas(np.asarray(losses, np.float64), np.asarray(reference, np.float64), clamp)
    if w.ndim != 1 or w.shape != d.shape:
        raise ValueError(f"weights {w.shape}, losses and reference must be 1-D of one length")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError(f"weights must be finite, >= 0 and not all 0 (got {w.tolist()})")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"losses and reference losses must be finite (got deltas {d.tolist()})")
    # softmax(log w + d) computed as w * exp(d - max d): no log(0) for zero weights, no overflow
    a = w * np.exp(d - d.max())
    a = a / a.sum()
    return (1.0 - smoothing) * a + smoothing / len(a)


def deltas(losses: Mapping[str, float], reference: Mapping[str, float], *, clamp: bool = True) -> dict[str, float]:
    """The per-domain excess losses the update uses (clamped at 0 when ``clamp``), by domain of ``losses``."""
    names = list(losses)
    d = _deltas(np.array([losses[n] for n in names], np.float64), np.array([reference[n] for n in names]), clamp)
    return {n: float(x) for n, x in zip(names, d)}


# ----------------------------------------------------------------------------------------------
# the trainer's side (jax and the runtime imported inside)


def reference_losses(cfg, domains: list[str], eval_sets: dict, *, devices=None) -> dict[str, float] | None:
    """The per-domain reference losses of dynamic batch loading (``data.dynamic``), or None when it is
    off: the configured ones (exactly the run's domains), or those of the model of
    ``data.dynamic.reference_run`` evaluated on this run's eval sets (``train.eval_batches`` batches per
    domain). Every domain needs eval data."""
    d = cfg.data.dynamic
    if not d.enabled:
        return None
    no_eval = [n for n in domains if n not in eval_sets]
    if no_eval:
        raise ConfigError(
            f"data.dynamic.enabled: domain(s) {', '.join(map(repr, no_eval))} have no eval data (the weight update needs a per-domain eval loss)"
        )
    if d.reference_losses is not None:
        check_reference_domains(d.reference_losses, domains, "data.dynamic.reference_losses")
        return {n: float(d.reference_losses[n]) for n in domains}
    from jaxeff.errors import CheckpointError
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir
    from jaxeff.train.runtime import Trainer

    field = "data.dynamic.reference_run"
    try:
        ckpt = Checkpointer(find_checkpoint_dir(d.reference_run), create=False)
    except CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None
    with ckpt:
        if ckpt.latest_step() is None:
            raise ConfigError(f"{field}: '{d.reference_run}' holds no checkpoint")
        saved = ckpt.read_config()
    if saved.get("method", "lm") != "lm":
        raise ConfigError(
            f"{field}: '{d.reference_run}' was trained with method '{saved.get('method')}'; "
            "the reference must be an 'lm' run (plain model parameters, e.g. jaxeff extract's)"
        )
    raw = cfg.to_dict()
    raw.update(model=saved["model"], method="lm")
    raw["train"]["init_from"] = None
    ref_cfg = type(cfg).model_validate(raw)
    if ref_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"{field}: the reference model has model.vocab_size={ref_cfg.model.vocab_size}, this run {cfg.model.vocab_size} (it must read the same tokens)"
        )
    ref = Trainer(ref_cfg, devices=devices)
    ev = ref.evaluate(ref.load_base_params(d.reference_run), {n: eval_sets[n] for n in domains}, cfg.train.eval_batches)
    return {n: ev[f"eval/loss/{n}"] for n in domains}


def update_mixture(loader, ev: dict[str, float], reference: dict[str, float], d) -> dict[str, float]:
    """Dynamic batch loading step: new loader weights from the eval losses ``ev`` (``eval/loss/<domain>``);
    returns the scalars to log (``data/weight/<domain>``, ``data/delta/<domain>``)."""
    losses = {n: ev[f"eval/loss/{n}"] for n in loader.domain_names}
    new = update_weights(loader.weights, losses, reference, clamp=d.clamp, smoothing=d.smoothing)
    loader.set_weights(new)
    delta = deltas(losses, reference, clamp=d.clamp)
    return {**{f"data/weight/{n}": w for n, w in loader.weights.items()}, **{f"data/delta/{n}": v for n, v in delta.items()}}
