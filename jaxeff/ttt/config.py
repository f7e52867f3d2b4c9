"""The `ttt` config section (method ``ttt_e2e``)."""

from jaxeff.schema import Section


class TTTConfig(Section):
    pass
