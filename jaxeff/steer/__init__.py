"""jaxeff.steer: activation addition (record a residual-stream difference, add it while generating).

See :mod:`jaxeff.steer.vectors` and docs/edit.md. From the command line: ``jaxeff generate
--steer-pos TEXT --steer-neg TEXT --steer-layer L --steer-scale S`` (or ``--steer-vector FILE``),
and ``jaxeff steer-vector`` to save a vector file.
"""

# Lazy: `jaxeff.cli` imports this package's cli module for every command, so importing the
# package must not import JAX.
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


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
