"""The quantization family's verb (registered into ``jaxeff``'s parser by :mod:`jaxeff.cli`):

    jaxeff quantize --checkpoint runs/qat_int4 --out runs/int4 quant.convert.format=int4

No jax at module level: this module is imported for every ``jaxeff`` command. See docs/quant.md.
"""

from __future__ import annotations


def register(sub) -> None:
    q = sub.add_parser("quantize", help="convert a lm/qat run to real low-bit kernels (method quantized)")
    q.add_argument("--checkpoint", required=True, help="run folder (or its checkpoints folder) of a lm or qat run")
    q.add_argument("--out", required=True, help="new run folder for the converted model, e.g. runs/float_int4")
    q.add_argument("--step", type=int, default=None)
    q.add_argument("overrides", nargs="*", default=[], help="e.g. quant.convert.format=int4")
    q.set_defaults(handler=cmd_quantize)


def cmd_quantize(args) -> int:
    from jaxeff.quant.convert import run

    return run(args)
