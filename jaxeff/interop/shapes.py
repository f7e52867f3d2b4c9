"""The parameter tree of :class:`jaxeff.models.Transformer` computed from its config, without tracing.

``jax.eval_shape(init)`` traces the whole model (~0.3 s for 24 layers, a third of loading a 0.5B
checkpoint); the tree is a fixed function of the config, written out here. A test pins it to
``jax.eval_shape(init_params)`` and ``logical_axes`` for configs covering every optional part
(GQA/MQA, tied and untied embeddings, biases, explicit head_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxeff.models.config import TransformerConfig


def _layout(cfg: TransformerConfig) -> dict:
    """Nested dict: parameter path -> (shape, logical axes)."""
    d, h, kvh, hd, ff = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.ff
    qkv_bias = cfg.use_bias or cfg.qkv_bias

    def dense(n_in, n_out, axes, bias):
        leaf = {"kernel": ((n_in, n_out), axes)}
        if bias:
            leaf["bias"] = ((n_out,), (axes[1],))
        return leaf

    def norm():
        return {"scale": ((d,), ("norm",))}

    layer = {
        "attn_norm": norm(),
        "mlp_norm": norm(),
        "attn": {
            "q": dense(d, h * hd, ("embed", "heads"), qkv_bias),
            "k": dense(d, kvh * hd, ("embed", "kv_heads"), qkv_bias),
            "v": dense(d, kvh * hd, ("embed", "kv_heads"), qkv_bias),
            "o": dense(h * hd, d, ("heads", "embed"), cfg.use_bias),
        },
        "mlp": {
            "gate": dense(d, ff, ("embed", "mlp"), cfg.use_bias),
            "up": dense(d, ff, ("embed", "mlp"), cfg.use_bias),
            "down": dense(ff, d, ("mlp", "embed"), cfg.use_bias),
        },
    }
    tree = {"embed": {"embedding": ((cfg.vocab_size, d), ("vocab", "embed"))}, "final_norm": norm()}
    tree.update({f"layers_{i}": layer for i in range(cfg.n_layers)})
    if not cfg.tie_embeddings:
        tree["lm_head"] = dense(d, cfg.vocab_size, ("embed", "vocab"), cfg.use_bias)
    return tree


def _is_entry(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def abstract_params(cfg: TransformerConfig):
    """``jax.eval_shape(lambda: init_params(Transformer(cfg), key))``: a tree of ShapeDtypeStruct."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], dtype), _layout(cfg), is_leaf=_is_entry)


def param_axes(cfg: TransformerConfig):
    """``logical_axes(Transformer(cfg))``: a tree of PartitionSpec of logical axis names."""
    return jax.tree.map(lambda e: PartitionSpec(*e[1]), _layout(cfg), is_leaf=_is_entry)


__all__ = ["abstract_params", "param_axes"]
