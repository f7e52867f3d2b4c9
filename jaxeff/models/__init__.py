"""Flax Linen models."""

from jaxeff.models.attention import attention, xla_attention
from jaxeff.models.config import TransformerConfig
from jaxeff.models.transformer import Transformer, TransformerOutput, init_cache, init_params, logical_axes, unbox_params

__all__ = [
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "attention",
    "xla_attention",
    "init_cache",
    "init_params",
    "logical_axes",
    "unbox_params",
]
