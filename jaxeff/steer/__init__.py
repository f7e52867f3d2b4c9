"""jaxeff.steer: activation addition (record a residual-stream difference, add it while generating).

See :mod:`jaxeff.steer.vectors` and docs/edit.md. From the command line: ``jaxeff generate
--steer-pos TEXT --steer-neg TEXT --steer-layer L --steer-scale S`` (or ``--steer-vector FILE``),
and ``jaxeff steer-vector`` to save a vector file.
"""

from jaxeff.steer.vectors import (
    check_layer,
    load_vector,
    record,
    record_text,
    residual_stream,
    save_vector,
    steer_generate,
    steered_apply,
    steered_forward,
)

__all__ = ["check_layer", "load_vector", "record", "record_text", "residual_stream", "save_vector", "steer_generate",
           "steered_apply", "steered_forward"]
