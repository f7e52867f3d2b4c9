"""The `prune` config section (method ``shear``)."""

from jaxeff.schema import Section


class PruneConfig(Section):
    pass
