"""Method ``ttt_e2e``: training through the inner loop, evaluation and generation with test-time updates.

* loss: mean over real tokens of the pre-update per-token losses of the inner loop (every chunk
  predicted with the fast weights updated through the previous chunk), differentiated through the
  whole loop w.r.t. all parameters, fast weights' initial values included (AdamW from ``optim``).
  The inner rate warms up as ``ttt.inner_lr_warmup_*`` say (``with_step``).
* apply (``jaxeff eval``, generation): without ``cache`` the inner loop runs over the given tokens,
  its targets the next input tokens of the same segment, and the logits come back in order. With a
  ``cache`` (``generate`` passes a plain :func:`jaxeff.models.init_cache`; a TTT state comes back)
  tokens are appended: one inner step each time b tokens fill a mini-batch and the next token
  (their last target) is known. See :mod:`jaxeff.ttt.generate`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxeff.ttt.config import TTTConfig
from jaxeff.models.transformer import TransformerOutput
from jaxeff.train.methods import Method, MethodContext, register_method
from jaxeff.ttt.inner import forward
from jaxeff.ttt.model import TTTSpec, add_fast_params, fast_logical_axes, refuse_fast_weights


def inner_lr_at(cfg, step):
    """Inner learning rate at optimizer update ``step`` (linear warm-up from ``inner_lr_warmup_from``
    times the rate over ``inner_lr_warmup_fraction`` of ``train.steps``)."""
    t = cfg.ttt
    n = t.inner_lr_warmup_fraction * cfg.train.steps
    if n <= 0 or t.inner_lr_warmup_from >= 1.0:
        return jnp.asarray(t.inner_lr, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / n, 1.0)
    return jnp.asarray(t.inner_lr, jnp.float32) * (t.inner_lr_warmup_from + (1.0 - t.inner_lr_warmup_from) * frac)


def next_token_targets(tokens, segment_ids):
    """Targets and mask from the inputs alone: the next input token when it is in the same (real)
    segment; the last position has none."""
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    same = jnp.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0), jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return targets, same.astype(jnp.float32)


def pad_to_chunks(b, *arrays):
    """Pad ``[batch, t]`` arrays at the end to a multiple of ``b`` (with zeros: masked, segment 0)."""
    t = arrays[0].shape[1]
    pad = -t % b
    if not pad:
        return arrays
    return tuple(jnp.pad(a, ((0, 0), (0, pad))) for a in arrays)


def evaluate_logits(spec: TTTSpec, params, tokens, positions=None, segment_ids=None):
    """Logits ``[batch, t, vocab]`` of the TTT model on ``tokens [batch, t]`` (no cache). With
    ``segment_ids`` the fast weights restart at every segment (no document sees another's updates);
    without, each row is one document."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = segment_ids is not None
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    targets, mask = next_token_targets(tokens, segment_ids)
    arrays = pad_to_chunks(spec.mini_batch, tokens, positions, segment_ids, targets, mask)
    _, logits, _, _ = forward(spec, params, *arrays, spec.inner_lr, return_logits=True, segments=segments)
    return logits[:, :t]


@register_method("ttt_e2e", config=TTTConfig, section="ttt")
def ttt_method(ctx: MethodContext) -> Method:
    """End-to-end test-time training (see the ``ttt`` config section and docs/ttt.md)."""
    cfg = ctx.cfg
    spec = TTTSpec.from_config(cfg)

    def loss(params, batch, rng, *, frozen, deterministic, step):
        lr = inner_lr_at(cfg, step)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll, _, _, _ = forward(spec, params, batch["inputs"], batch["positions"], batch["segment_ids"], batch["targets"], mask, lr)
        n = mask.sum()
        value = (nll * mask).sum() / jnp.maximum(n, 1.0)
        # how much the inner loop helps within a sequence: first vs last chunk
        b = spec.mini_batch
        first = (nll[:, :b] * mask[:, :b]).sum() / jnp.maximum(mask[:, :b].sum(), 1.0)
        last = (nll[:, -b:] * mask[:, -b:]).sum() / jnp.maximum(mask[:, -b:].sum(), 1.0)
        return value, {"ttt/inner_lr": lr, "ttt/first_chunk_loss": first, "ttt/last_chunk_loss": last}

    def apply(model, params, tokens, *, positions=None, segment_ids=None, cache=None, deterministic=True, return_hidden=False):
        if return_hidden:
            raise ValueError("ttt_e2e: return_hidden is not supported")
        if cache is None:
            return TransformerOutput(evaluate_logits(spec, params, tokens, positions, segment_ids), None, None)
        from jaxeff.ttt.generate import extend

        logits, state = extend(spec, params, tokens, cache)
        return TransformerOutput(logits, None, state)

    def model_params(params):
        # no plain Transformer stands for a TTT model: the consumers of model_params (jaxeff convert
        # --to-hf, task-vector merges) get a one-line refusal instead of params["model"] without the
        # fast MLPs
        refuse_fast_weights(params, "method")
        return params["model"]

    return Method(
        "ttt_e2e",
        loss,
        prepare_params=lambda p, rng: add_fast_params(spec, p, rng),
        logical_axes=lambda axes: fast_logical_axes(spec, axes),
        model_params=model_params,
        apply=apply,
        with_step=True,
    )
