"""Knowledge distillation (method `distill`): a student learns from a frozen teacher checkpoint.

Losses are pure functions usable without the trainer (``kd_loss``, ``cosine_loss``, ...). The
names load their module on first use (so ``jaxeff.cli``, which imports the family's CLI modules for
every command, does not import JAX); ``jaxeff.distill.method`` registers the ``distill`` method
with the trainer. See docs/distill.md.
"""

from jaxeff._lazy import lazy_getattr

_EXPORTS = {
    "DistillConfig": "jaxeff.distill.config",
    **{
        name: "jaxeff.distill.losses"
        for name in (
            "cosine_loss",
            "cosine_similarity",
            "distillation_loss",
            "generalized_jsd",
            "kd_loss",
            "kl_divergence",
            "masked_mean",
            "token_divergence",
        )
    },
    **{name: "jaxeff.distill.method" for name in ("distill_method", "every_other_layer_params", "layer_pairs")},
    **{name: "jaxeff.distill.teacher" for name in ("Teacher", "load_teacher")},
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
