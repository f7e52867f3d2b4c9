"""The `distill` config section: knowledge distillation (method distill)."""

from jaxeff.schema import Section


class DistillConfig(Section):
    pass
