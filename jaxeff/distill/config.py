"""The `distill` config section: knowledge distillation (method distill).

Loss (all terms masked by the loss mask and averaged over real tokens)::

    ce_weight · CE(student, labels)
  + kd_weight · T² · D(teacher ‖ student at temperature T)      D = divergence below
  + cos_weight · mean over layer pairs of (1 − cos(proj(h_s), h_t))

The teacher is read from ``teacher_checkpoint`` (a run folder or its ``checkpoints`` folder) when
the method is built (not when the config is loaded); its architecture comes from the config saved
in that checkpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxeff.schema import Section


class DistillConfig(Section):
    teacher_checkpoint: str | None = None  # run folder (runs/<name>) or its checkpoints/ folder
    teacher_step: int | None = Field(None, ge=0)  # checkpoint step; None = newest
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"  # teacher params and compute
    temperature: float = Field(1.0, gt=0.0)  # T (the soft loss is multiplied by T²)
    ce_weight: float = Field(0.5, ge=0.0)  # λ_ce: cross-entropy with the labels
    kd_weight: float = Field(0.5, ge=0.0)  # λ_kd: soft-target divergence (already × T²)
    cos_weight: float = Field(0.0, ge=0.0)  # λ_cos: hidden-state cosine loss
    # forward_kl: KL(p_t ‖ p_s) (Hinton); reverse_kl: KL(p_s ‖ p_t);
    # jsd: generalised Jensen-Shannon β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0)
    # hidden-state pairs for the cosine loss, as indices into hidden_states (0 = embeddings,
    # i = output of block i, 1-based): "last" = (n_s, n_t); "every_other" = (i, 2i) for i = 1..n_s,
    # i.e. student layer i ↔ teacher layer 2i+1 counting from 0; or explicit [[s, t], ...]
    layer_map: Literal["last", "every_other"] | tuple[tuple[int, int], ...] = "last"
    # random: the usual initialisation (or train.init_from); every_other_layer: DistilBERT — the
    # student's block i starts as the teacher's block 2i (0, 2, 4, ...), embeddings, final norm
    # and head copied (same width needed)
    student_init: Literal["random", "every_other_layer"] = "random"
    # offline mode: train from the teacher's top-k logits precomputed by `python -m
    # jaxeff.distill.offline` (an .npz) instead of running the teacher; see jaxeff/distill/offline.py
    offline_topk: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.layer_map, tuple):
            if not self.layer_map:
                raise ValueError("layer_map: expected 'last', 'every_other' or a non-empty list of [student, teacher] pairs")
            for s, t in self.layer_map:
                if s < 0 or t < 0:
                    raise ValueError(f"layer_map: hidden-state indices must be >= 0 (got [{s}, {t}])")
        if self.ce_weight == 0 and self.kd_weight == 0 and self.cos_weight == 0:
            raise ValueError("ce_weight, kd_weight and cos_weight are all 0: nothing to train")
        return self
