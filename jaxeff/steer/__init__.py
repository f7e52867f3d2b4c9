"""jaxeff.steer: activation addition (record a residual-stream difference, add it while generating).

See :mod:`jaxeff.steer.vectors` and docs/edit.md. From the command line: ``jaxeff generate
--steer-pos TEXT --steer-neg TEXT --steer-layer L --steer-scale S`` (or ``--steer-vector FILE``),
and ``jaxeff steer-vector`` to save a vector file.
"""

# Lazy: `jaxeff.cli` imports this package's cli module for every command, so importing the
# package must not import JAX.
from jaxeff._lazy import lazy_getattr

_EXPORTS = {
    "check_layer": "jaxeff.steer.vectors",
    "load_vector": "jaxeff.steer.vectors",
    "record": "jaxeff.steer.vectors",
    "record_text": "jaxeff.steer.vectors",
    "residual_stream": "jaxeff.steer.vectors",
    "save_vector": "jaxeff.steer.vectors",
    "steer_generate": "jaxeff.steer.vectors",
    "steered_apply": "jaxeff.steer.vectors",
    "steered_forward": "jaxeff.steer.vectors",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
