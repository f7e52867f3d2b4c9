"""A LLaMA-style decoder in Flax Linen: RMSNorm, RoPE, GQA attention, SwiGLU MLP, KV cache.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``,
``norm``) that the trainer maps onto mesh axes. Every projection is a 2-D ``Dense`` kernel
``[in, out]`` so parameter-tree transforms (LoRA, quantization, pruning) see plain matrices.

Usage::

    model = Transformer(TransformerConfig(vocab_size=264, d_model=128, n_layers=2, n_heads=4))
    params = model.init(jax.random.key(0), tokens)["params"]   # boxed: see unbox_params
    out = model.apply({"params": params}, tokens)               # out.logits [batch, seq, vocab]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.models.attention import BANDED_MIN_RATIO, attention, resolve_impl
from jaxeff.models.config import TransformerConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TransformerOutput(NamedTuple):
    logits: jax.Array  # [batch, seq, vocab], float32
    hidden_states: tuple[jax.Array, ...] | None  # (embeddings, block 1, ..., block n), pre final norm
    cache: dict[str, Any] | None  # updated KV cache when one was passed in


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache: per layer ``k, v [batch, max_len, kv_heads, head_dim]`` and the number
    of tokens already written (``index``)."""
    dtype = dtype or _DTYPES[config.dtype]
    shape = (batch, max_len, config.kv_heads, config.hd)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layers))
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> jax.Array:
    """Inverse frequencies ``theta^(-2i/head_dim)`` ``[head_dim // 2]``, with optional scaling
    (:class:`jaxeff.models.config.RopeScaling`)."""
    half = head_dim // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return freq
    if scaling.type == "linear":
        return freq / scaling.factor
    orig = scaling.original_max_position_embeddings
    wavelen = 2 * jnp.pi / freq
    low_wavelen, high_wavelen = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    ramp = (1 - smooth) * freq / scaling.factor + smooth * freq
    return jnp.where(wavelen < high_wavelen, freq, jnp.where(wavelen > low_wavelen, freq / scaling.factor, ramp))


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
    """Rotary embedding on ``x [batch, seq, heads, head_dim]`` at ``positions [batch, seq]``
    (rotating the two halves of head_dim, as in LLaMA / Hugging Face)."""
    freq = rope_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * freq  # [batch, seq, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """``mask [features]`` (optional, pruning): the mean square is taken over the features whose
        mask is non-zero only (``sum(x² · [mask≠0]) / count(mask≠0)``, whatever the non-zero
        values are), and the output is multiplied by ``mask``; see :mod:`jaxeff.prune.shear`."""
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        if mask is None:
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            return (y * scale.astype(jnp.float32)).astype(self.dtype)
        m = mask.astype(jnp.float32)
        kept = (m != 0).astype(jnp.float32)
        ms = jnp.sum(xf * xf * kept, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(kept), 1.0)
        y = xf * jax.lax.rsqrt(ms + self.eps)
        return (y * scale.astype(jnp.float32) * m).astype(self.dtype)


def _dense(cfg: TransformerConfig, features: int, axes: tuple[str, str], name: str, std: float | None = None, bias: bool | None = None):
    init = nn.initializers.normal(std or cfg.init_std)
    return nn.Dense(
        features,
        use_bias=cfg.use_bias if bias is None else bias,
        dtype=_DTYPES[cfg.dtype],
        param_dtype=_DTYPES[cfg.param_dtype],
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class Attention(nn.Module):
    config: TransformerConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, deterministic, head_mask=None, tree_mask=None):
        """``head_mask [heads]`` (optional, pruning) multiplies each head's context before ``o``.
        ``tree_mask [seq, seq]`` (optional, with ``cache`` only): which of the new tokens each new
        token sees (True = visible) instead of causality among them; every cached token stays visible."""
        cfg = self.config
        b, t, _ = x.shape
        h, kvh, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = _dense(cfg, h * hd, ("embed", "heads"), "q", bias=qkv_bias)(x).reshape(b, t, h, hd)
        k = _dense(cfg, kvh * hd, ("embed", "kv_heads"), "k", bias=qkv_bias)(x).reshape(b, t, kvh, hd)
        v = _dense(cfg, kvh * hd, ("embed", "kv_heads"), "v", bias=qkv_bias)(x).reshape(b, t, kvh, hd)
        q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        new_cache = None
        if cache is None:
            y = attention(q, k, v, impl=cfg.attention_impl, causal=True, window=self.window, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        else:
            index = cache["index"]
            ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
            new_cache = {"k": ck, "v": cv}

            def against_cache():
                return attention(
                    q, ck.astype(q.dtype), cv.astype(q.dtype), impl=cfg.attention_impl, causal=True, window=self.window, q_offset=index, kv_valid=index + t
                )

            if tree_mask is not None:
                y = attention(
                    q,
                    ck.astype(q.dtype),
                    cv.astype(q.dtype),
                    causal=False,
                    q_offset=index,
                    kv_valid=index + t,
                    mask=tree_attention_mask(tree_mask, index, ck.shape[1]),
                )
            elif self.window is not None and t >= BANDED_MIN_RATIO * self.window and resolve_impl(cfg.attention_impl) == "xla":
                # a long prompt into an empty cache sees only itself: banded window attention,
                # O(t * window) instead of scores against the whole cache
                y = jax.lax.cond(index == 0, lambda: attention(q, k, v, impl="xla", causal=True, window=self.window), against_cache)
            else:
                y = against_cache()
        if head_mask is not None:
            y = y * head_mask.astype(y.dtype)[None, None, :, None]
        y = y.reshape(b, t, h * hd)
        y = _dense(cfg, cfg.d_model, ("heads", "embed"), "o", std=out_std)(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y, new_cache


def tree_attention_mask(tree_mask: jax.Array, index, kv_len: int) -> jax.Array:
    """``[t, kv_len]`` visibility of cache slots for ``t`` new tokens written at ``index..index+t-1``:
    every slot before ``index`` is visible, slot ``index + j`` as ``tree_mask[i, j]`` says, later slots
    are not (Medusa's tree attention)."""
    rel = jnp.arange(kv_len) - index  # [kv_len]
    t = tree_mask.shape[0]
    inside = jnp.take(tree_mask, jnp.clip(rel, 0, t - 1), axis=1)  # [t, kv_len]
    return jnp.where(rel[None, :] < 0, True, (rel[None, :] < t) & inside)


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, deterministic, int_mask=None):
        """``int_mask [d_ff]`` (optional, pruning) multiplies the SwiGLU product before ``down``."""
        cfg = self.config
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        gate = _dense(cfg, cfg.ff, ("embed", "mlp"), "gate")(x)
        up = _dense(cfg, cfg.ff, ("embed", "mlp"), "up")(x)
        h = nn.silu(gate) * up
        if int_mask is not None:
            h = h * int_mask.astype(h.dtype)
        y = _dense(cfg, cfg.d_model, ("mlp", "embed"), "down", std=out_std)(h)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
    config: TransformerConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, deterministic, masks=None, tree_mask=None):
        """``masks`` (optional, pruning): this layer's entries of :class:`Transformer`'s masks,
        ``head [heads]``, ``attn`` and ``mlp`` (scalars), ``intermediate [d_ff]``, ``hidden [d_model]``
        (any subset; absent = 1). ``tree_mask``: see :class:`Attention`."""
        cfg = self.config
        norm = dict(eps=cfg.norm_eps, dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype])
        if masks is None:
            y, new_cache = Attention(cfg, self.window, name="attn")(
                RMSNorm(**norm, name="attn_norm")(x), positions, segment_ids, cache, deterministic, tree_mask=tree_mask
            )
            x = x + y
            x = x + MLP(cfg, name="mlp")(RMSNorm(**norm, name="mlp_norm")(x), deterministic)
        else:
            hidden = masks.get("hidden")
            y, new_cache = Attention(cfg, self.window, name="attn")(
                RMSNorm(**norm, name="attn_norm")(x, hidden), positions, segment_ids, cache, deterministic, masks.get("head"), tree_mask
            )
            x = x + _scale_output(y, masks.get("attn"), hidden)
            y = MLP(cfg, name="mlp")(RMSNorm(**norm, name="mlp_norm")(x, hidden), deterministic, masks.get("intermediate"))
            x = x + _scale_output(y, masks.get("mlp"), hidden)
        x = nn.with_logical_constraint(x, ("batch", None, None))
        return x, new_cache


def _scale_output(y, layer_mask, hidden_mask):
    """A sublayer output ``y [batch, seq, d_model]`` times its layer mask (scalar) and the hidden
    mask ``[d_model]`` (either may be None)."""
    if layer_mask is not None:
        y = y * layer_mask.astype(y.dtype)
    if hidden_mask is not None:
        y = y * hidden_mask.astype(y.dtype)
    return y


class Transformer(nn.Module):
    """Decoder-only LM. ``tokens [batch, seq]`` int -> :class:`TransformerOutput`.

    ``positions`` (RoPE) default to ``0..seq-1`` (or continue from the cache index); pass the
    packed positions with ``segment_ids`` so documents in one row do not see each other.
    With ``cache`` (from :func:`init_cache`) the new tokens are appended and attend to the
    cached ones; the updated cache is returned in the output.

    ``masks`` (optional; structured pruning, :mod:`jaxeff.prune.shear`) is a dict with any of
    ``head [n_layers, n_heads]`` (each head's context before ``o``), ``attn [n_layers]`` and
    ``mlp [n_layers]`` (the sublayer outputs), ``intermediate [n_layers, d_ff]`` (the SwiGLU
    product) and ``hidden [d_model]`` (the embeddings, every sublayer output and every RMSNorm
    output, final norm included; those norms average over the kept features only). Without
    ``masks`` the computation is exactly the unmasked one.

    ``tree_mask [seq, seq]`` (bool, with ``cache`` only; Medusa, :mod:`jaxeff.decode.medusa`): the
    new tokens are a tree of candidates rather than a sequence; token i sees the cached tokens and
    the new tokens j with ``tree_mask[i, j]`` (its ancestors and itself). Pass their ``positions``
    (cache index + depth in the tree). Sliding-window models are refused with it.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, deterministic=True, return_hidden=False, masks=None, tree_mask=None):
        cfg = self.config
        b, t = tokens.shape
        if tree_mask is not None:
            if cache is None:
                raise ValueError("tree_mask: needs a KV cache (tree attention verifies candidates while decoding)")
            if tree_mask.shape != (t, t):
                raise ValueError(f"tree_mask: expected shape ({t}, {t}) for {t} new tokens (got {tuple(tree_mask.shape)})")
            if any(w is not None for w in cfg.windows):
                raise ValueError("tree_mask: sliding-window attention is not supported with tree attention")
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=_DTYPES[cfg.dtype],
            param_dtype=_DTYPES[cfg.param_dtype],
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        x = embed(tokens)
        hidden_mask = None if masks is None else masks.get("hidden")
        if hidden_mask is not None:
            x = x * hidden_mask.astype(x.dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", None, None))
        hidden = [x]
        block_cls = nn.remat(Block, static_argnums=(5,)) if cfg.remat else Block
        new_layers = []
        for i, window in enumerate(cfg.windows):
            layer_cache = None
            if cache is not None:
                layer_cache = {**cache["layers"][i], "index": cache["index"]}
            if masks is None and tree_mask is None:
                x, lc = block_cls(cfg, window, name=f"layers_{i}")(x, positions, segment_ids, layer_cache, deterministic)
            else:
                layer_masks = None if masks is None else {k: (v if k == "hidden" else v[i]) for k, v in masks.items() if v is not None}
                x, lc = block_cls(cfg, window, name=f"layers_{i}")(x, positions, segment_ids, layer_cache, deterministic, layer_masks, tree_mask)
            new_layers.append(lc)
            hidden.append(x)
        final_norm = RMSNorm(cfg.norm_eps, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype], name="final_norm")
        x = final_norm(x) if hidden_mask is None else final_norm(x, hidden_mask)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x)
        logits = logits.astype(jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = {"index": cache["index"] + t, "layers": tuple(new_layers)}
        return TransformerOutput(logits, tuple(hidden) if return_hidden else None, new_cache)


def unbox_params(boxed):
    """Strip Flax's logical-partitioning boxes from an ``init`` result: plain arrays."""
    return nn.meta.unbox(boxed)


def logical_axes(model: Transformer, tokens_shape=(1, 8)):
    """Logical axis names of every parameter (a tree of ``PartitionSpec``), without allocating."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens_shape, jnp.int32)))
    return nn.get_partition_spec(abstract)["params"]


def init_params(model: Transformer, rng, tokens_shape=(1, 8)):
    """Plain (unboxed) parameters."""
    return unbox_params(model.init(rng, jnp.zeros(tokens_shape, jnp.int32))["params"])
