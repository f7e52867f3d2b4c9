"""Knowledge distillation (method `distill`): a student learns from a frozen teacher checkpoint.

Losses are pure functions usable without the trainer (``kd_loss``, ``cosine_loss``, ...);
importing this package registers the ``distill`` method with the trainer. See docs/distill.md.
"""

from jaxeff.distill.config import DistillConfig
from jaxeff.distill.losses import (
    cosine_loss,
    cosine_similarity,
    distillation_loss,
    generalized_jsd,
    kd_loss,
    kl_divergence,
    masked_mean,
    token_divergence,
)
from jaxeff.distill.method import distill_method, every_other_layer_params, layer_pairs, load_teacher

__all__ = [
    "DistillConfig", "cosine_loss", "cosine_similarity", "distillation_loss", "generalized_jsd", "kd_loss",
    "kl_divergence", "masked_mean", "token_divergence", "distill_method", "every_other_layer_params",
    "layer_pairs", "load_teacher",
]
