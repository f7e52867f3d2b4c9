"""Method ``distill``: train a student (the run's ``model``) against a frozen teacher checkpoint.

The teacher's architecture is read from the config saved in its checkpoint; its parameters are the
method's ``frozen`` input: sharded like the student's (same logical axis rules), passed to every
jitted step, never differentiated, never given optimizer state, never checkpointed. Optionally they
are held and run in bfloat16 (``distill.teacher_dtype``).

The trained tree is ``{"model": <the student's params>}`` plus ``"proj"`` (one learned ``[d_student,
d_teacher]`` matrix per layer pair) when the cosine loss is on and the widths differ; evaluation and
generation use ``params["model"]`` (runs written before 2026-12 say ``"student"``; they still load).

Only a trainer built to train reads the teacher (or the offline top-k table): one built to read a
saved run (``ctx.purpose == "load"``: eval, generate, export, ``jaxeff.runs``) gets the student alone
(``{"model": ...}``; the projections serve only the training loss and are not read), so a distilled
student stays usable after its teacher's folder is gone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.distill.config import DistillConfig
from jaxeff.distill.losses import distillation_loss
from jaxeff.distill.teacher import load_teacher
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, TransformerConfig, logical_axes
from jaxeff.train.checkpoint import RUNTIME_ONLY, first_difference
from jaxeff.train.methods import Method, MethodContext, lm_forward, lm_forward_loss, register_method


def layer_pairs(layer_map, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
    """Hidden-state index pairs (0 = embeddings, i = block i's output) for the cosine loss."""
    if layer_map == "last":
        return ((n_student, n_teacher),)
    if layer_map == "every_other":
        if 2 * n_student > n_teacher:
            raise ConfigError(
                f"distill.layer_map: every_other pairs student layer i with teacher layer 2i, which "
                f"needs a teacher of >= {2 * n_student} layers (it has {n_teacher})"
            )
        return tuple((i, 2 * i) for i in range(1, n_student + 1))
    for s, t in layer_map:
        if s > n_student or t > n_teacher:
            raise ConfigError(f"distill.layer_map: pair [{s}, {t}] is out of range (student has hidden states 0..{n_student}, teacher 0..{n_teacher})")
    return tuple(tuple(p) for p in layer_map)


def every_other_layer_params(teacher_params, teacher_cfg: TransformerConfig, student_cfg: TransformerConfig):
    """DistilBERT initialisation: student block i = teacher block 2i (0, 2, 4, ...); embeddings,
    final norm and output head copied. Needs the same shapes apart from depth."""
    ignore = set(RUNTIME_ONLY) | {"n_layers", "sliding_window", "param_dtype", "max_seq_len"}
    a = {k: v for k, v in dataclasses.asdict(teacher_cfg).items() if k not in ignore}
    b = {k: v for k, v in dataclasses.asdict(student_cfg).items() if k not in ignore}
    diff = first_difference(a, b)
    if diff:
        raise ConfigError(
            f"distill.student_init: every_other_layer needs the teacher's layer shapes, but model.{diff} "
            f"is {b[diff]!r} here and {a[diff]!r} in the teacher"
        )
    n_s, n_t = student_cfg.n_layers, teacher_cfg.n_layers
    if 2 * (n_s - 1) >= n_t:
        raise ConfigError(f"distill.student_init: every_other_layer takes teacher layers 0, 2, ..., {2 * (n_s - 1)} but the teacher has {n_t} layers")
    out = {k: v for k, v in teacher_params.items() if not k.startswith("layers_")}
    for i in range(n_s):
        out[f"layers_{i}"] = teacher_params[f"layers_{2 * i}"]
    return out


@register_method("distill", config=DistillConfig)
def distill_method(ctx: MethodContext) -> Method:
    """Knowledge distillation into ``ctx.model`` from ``cfg.distill.teacher_checkpoint`` (see the
    ``distill`` config section for the loss)."""
    cfg, model = ctx.cfg, ctx.model
    d = cfg.distill
    seq = cfg.data.seq_len
    if not ctx.training:
        return _student_method(model)
    if d.offline_topk:
        return _offline_method(cfg, model)
    if d.student_init == "every_other_layer" and cfg.train.init_from:
        raise ConfigError("distill.student_init: every_other_layer and train.init_from both initialise the student; use one")
    teacher = load_teacher(d.teacher_checkpoint, d.teacher_step, model.config, seq, dtype=d.teacher_dtype)
    teacher_model = Transformer(teacher.config)
    s_cfg, t_cfg = model.config, teacher.config
    pairs = layer_pairs(d.layer_map, s_cfg.n_layers, t_cfg.n_layers) if d.cos_weight else ()
    project = bool(pairs) and s_cfg.d_model != t_cfg.d_model
    init_tree = None
    if d.student_init == "every_other_layer":
        init_tree = every_other_layer_params(teacher.params, t_cfg, s_cfg)
    frozen = jax.tree.map(lambda x: x.astype(jnp.dtype(d.teacher_dtype)), teacher.params)

    def prepare_params(params, rng):
        if init_tree is not None:
            params = jax.tree.map(lambda p, t: jnp.asarray(t, p.dtype), params, init_tree)
        out = {"model": params}
        if project:
            std = s_cfg.d_model**-0.5
            keys = jax.random.split(rng, len(pairs))
            out["proj"] = {
                f"pair_{k}": {"kernel": std * jax.random.normal(keys[k], (s_cfg.d_model, t_cfg.d_model), jnp.float32)} for k in range(len(pairs))
            }
        return out

    def axes(model_axes):
        out = {"model": model_axes}
        if project:
            out["proj"] = {f"pair_{k}": {"kernel": P("embed", None)} for k in range(len(pairs))}
        return out

    def loss(params, batch, rng, *, frozen, deterministic):
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=bool(pairs))
        s_out = model.apply({"params": params["model"]}, batch["inputs"], deterministic=deterministic, rngs={"dropout": rng}, **kw)
        t_out = jax.lax.stop_gradient(teacher_model.apply({"params": frozen}, batch["inputs"], deterministic=True, **kw))
        s_hidden, t_hidden = [], []
        for k, (si, ti) in enumerate(pairs):
            h = s_out.hidden_states[si].astype(jnp.float32)
            if project:
                h = h @ params["proj"][f"pair_{k}"]["kernel"]
            s_hidden.append(h)
            t_hidden.append(t_out.hidden_states[ti])
        return distillation_loss(
            s_out.logits,
            t_out.logits,
            batch["targets"],
            batch["loss_mask"],
            ce_weight=d.ce_weight,
            kd_weight=d.kd_weight,
            cos_weight=d.cos_weight,
            student_hidden=s_hidden,
            teacher_hidden=t_hidden,
            temperature=d.temperature,
            divergence=d.divergence,
            beta=d.jsd_beta,
        )

    return Method(
        "distill",
        loss,
        prepare_params=prepare_params,
        logical_axes=axes,
        model_params=lambda p: p["model"],
        frozen=frozen,
        frozen_logical_axes=logical_axes(teacher_model, (1, seq)),
    )


def _student_method(model: Transformer) -> Method:
    """The distilled student as a saved run is read (no teacher): its loss is the plain LM loss."""

    def loss(params, batch, rng, *, frozen, deterministic):
        value, _ = lm_forward_loss(model, params["model"], batch, rng, deterministic)
        return value, {}

    return Method(
        "distill", loss, prepare_params=lambda p, rng: {"model": p}, logical_axes=lambda axes: {"model": axes}, model_params=lambda p: p["model"]
    )


def _offline_method(cfg, model: Transformer) -> Method:
    """Distillation from precomputed teacher top-k logits (jaxeff.distill.offline)."""
    from jaxeff.distill.offline import load_topk, lookup, topk_kd_loss
    from jaxeff.train.losses import cross_entropy

    d = cfg.distill
    for bad, why in [
        (d.cos_weight > 0, "distill.cos_weight: the hidden-state loss needs the online teacher"),
        (d.divergence != "forward_kl", "distill.divergence: offline top-k supports forward_kl only"),
        (d.student_init != "random", "distill.student_init: every_other_layer needs the teacher checkpoint"),
    ]:
        if bad:
            raise ConfigError(f"{why} (distill.offline_topk is set)")
    table = load_topk(d.offline_topk, cfg.data.seq_len, model.config.vocab_size)

    def loss(params, batch, rng, *, frozen, deterministic):
        out = lm_forward(model, params["model"], batch, rng, deterministic)
        mask = batch["loss_mask"].astype(jnp.float32)
        ce = cross_entropy(out.logits, batch["targets"], mask)[0]
        idx, found = lookup(frozen["fingerprints"], batch["inputs"], batch["segment_ids"])
        kd = topk_kd_loss(
            out.logits, frozen["topk_logits"][idx], frozen["topk_ids"][idx], mask * found[:, None].astype(jnp.float32), temperature=d.temperature
        )
        total = d.ce_weight * ce + d.kd_weight * kd
        return total, {"ce": ce, "kd": kd, "offline_miss": 1.0 - found.astype(jnp.float32).mean()}

    return Method(
        "distill",
        loss,
        prepare_params=lambda p, rng: {"model": p},
        logical_axes=lambda axes: {"model": axes},
        model_params=lambda p: p["model"],
        frozen=table,
    )
