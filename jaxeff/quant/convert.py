"""Conversion to a real quantized model: method ``quantized`` and ``jaxeff quantize``.

The Dense kernels on ``quant.weight_layers`` become ``pallas_kernels.quant.QuantizedWeight`` leaves
(``quant.convert.format``: int8 per channel or per group, int4 / nf4 per group of 64, or w8a8 = a
per-channel int8 weight run by ``int8_matmul`` with int8 activations and optional LLM.int8()
outlier decomposition). Running the model intercepts those Dense layers and calls
``quantized_matmul`` / ``int8_matmul`` (backend ``quant.convert.backend``; ``auto`` = the Pallas
kernel on GPU/TPU, the jnp reference on CPU, as everywhere in jaxeff: :mod:`jaxeff.targets`). Embeddings, norms and biases stay float.

Method ``quantized``: ``prepare_params`` converts float model parameters (fresh, from
``train.init_from``, or restored from a converted checkpoint), nothing is trainable, and
``Method.run`` (what ``jaxeff eval`` and ``jaxeff generate`` use) runs the kernels.

Convert a float (method ``lm``) or QAT (method ``qat``: its quantize-dequantize weights) run::

    jaxeff quantize --checkpoint runs/float --out runs/float_int4 quant.convert.format=int4
    jaxeff generate --checkpoint runs/float_int4 --prompt "x = "
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from jaxeff.quant.config import QuantConfig
from jaxeff.dense import intercept_dense
from jaxeff.quant.intercept import dense_paths, get_path, set_path
from jaxeff.targets import dense_modules, resolve_kernel_backend
from jaxeff.train.methods import Method, MethodContext, register_method
from pallas_kernels.quant import QuantizedWeight, int8_matmul, quantize


def quantize_kernel(kernel, ccfg) -> QuantizedWeight:
    fmt = "int8" if ccfg.format == "w8a8" else ccfg.format
    group = None if ccfg.format == "w8a8" else ccfg.group_size
    return quantize(kernel, fmt, group_size=group, symmetric=ccfg.symmetric, double_quant=ccfg.double_quant)


def convert_params(params, qcfg) -> dict:
    """Model parameters with each selected kernel replaced by a ``QuantizedWeight``."""
    for path in dense_paths(params, qcfg.weight_layers):
        node = get_path(params, path)
        params = set_path(params, path, {**node, "kernel": quantize_kernel(node["kernel"], qcfg.convert)})
    return params


def quantized_apply(model, params, tokens, qcfg, *, backend=None, **kwargs):
    """Run the model on converted parameters: quantized kernels through the low-bit matmuls
    (:func:`jaxeff.dense.intercept_dense` runs every ``QuantizedWeight`` kernel; W8A8 names its matmul)."""
    ccfg = qcfg.convert
    backend = resolve_kernel_backend(backend or ccfg.backend)
    matmul = {}
    if ccfg.format == "w8a8":
        w8a8 = functools.partial(int8_matmul, outlier_threshold=ccfg.outlier_threshold, backend=backend)
        matmul = {p: w8a8 for p in dense_modules(params) if _is_qw(get_path(params, p)["kernel"])}
    with intercept_dense(matmul=matmul, backend=backend):
        return model.apply({"params": params}, tokens, **kwargs)


def _is_qw(x):
    return isinstance(x, QuantizedWeight)


def model_bytes(params) -> dict[str, int]:
    """Bytes of a (converted or float) parameter tree: ``total``, ``quantized`` (QuantizedWeight
    leaves: packed data, scales, zero points) and ``float`` (everything else)."""
    q = f = 0
    for leaf in jax.tree.leaves(params, is_leaf=_is_qw):
        if _is_qw(leaf):
            q += leaf.nbytes
        else:
            f += math.prod(leaf.shape) * leaf.dtype.itemsize
    return {"total": q + f, "quantized": q, "float": f}


@register_method("quantized", config=QuantConfig, section="quant")
def quantized_method(ctx: MethodContext) -> Method:
    """A converted model: float parameters become QuantizedWeight kernels; nothing trains."""
    cfg, model = ctx.cfg, ctx.model
    qcfg = cfg.quant

    def apply(model_, params, tokens, **kwargs):
        return quantized_apply(model_, params, tokens, qcfg, **kwargs)

    def loss(params, batch, rng, *, frozen, deterministic):
        from jaxeff.train.losses import cross_entropy

        out = apply(model, params, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], deterministic=True)
        value, _ = cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return jax.lax.stop_gradient(value), {}

    def logical_axes(model_axes):  # quantized leaves are replicated; the rest keeps the model's axes
        abstract = jax.eval_shape(lambda p: convert_params(p, qcfg), ctx.abstract_params)
        for path in dense_paths(model_axes, qcfg.weight_layers):
            qw = get_path(abstract, path)["kernel"]
            spec = dataclasses.replace(qw, **{f: (None if getattr(qw, f) is None else P()) for f in ("data", "scales", "zeros", "dq_scales", "dq_mean")})
            model_axes = set_path(model_axes, path, {**get_path(model_axes, path), "kernel": spec})
        return model_axes

    return Method(
        "quantized",
        loss,
        trainable=lambda params: jax.tree.map(lambda _: False, params),
        prepare_params=lambda params, rng: convert_params(params, qcfg),
        logical_axes=logical_axes,
        apply=apply,
    )


def convert_checkpoint(checkpoint: str, out: str, overrides=(), step: int | None = None) -> dict:
    """Write a converted run of the run at ``checkpoint`` (method lm or qat) as the run folder ``out``
    (``out/checkpoints`` + ``out/config.yaml`` with its provenance); ``overrides`` (dotted, e.g.
    ``quant.convert.format=int4``) apply to the saved config with ``method=quantized``. Returns the
    byte counts of the source and converted parameters."""
    from pathlib import Path

    from jaxeff.config import from_dict, with_overrides
    from jaxeff.errors import ConfigError
    from jaxeff.runs import check_new_run, load_model_params, save_model_run
    from jaxeff.train.checkpoint import ONE_DEVICE, Checkpointer, find_checkpoint_dir, new_lm_run

    ckpt_dir = find_checkpoint_dir(checkpoint)
    with Checkpointer(ckpt_dir, create=False) as probe:
        step = probe.latest_step() if step is None else step
        saved = probe.read_config(step)
    if saved.get("method") not in ("lm", "qat"):
        raise ConfigError(f"--checkpoint: run '{checkpoint}' has method '{saved.get('method')}', expected lm or qat")
    saved = with_overrides(saved, ONE_DEVICE)
    raw = {k: v for k, v in saved.items() if k != "provenance"}
    raw = with_overrides(with_overrides(raw, {**new_lm_run(Path(out)), "method": "quantized"}), list(overrides))
    cfg = from_dict(raw)
    provenance = {
        "command": "jaxeff quantize",
        "source": str(Path(checkpoint).absolute()),
        "step": int(step),
        "method": saved.get("method"),
        "format": cfg.quant.convert.format,
        "data": "as the source run",
    }
    check_new_run(out)
    _, base = load_model_params(ckpt_dir, step)  # the source's model (a qat run: its float weights)
    converted = convert_params(base, cfg.quant)  # what the method's prepare_params does
    save_model_run(converted, cfg, provenance=provenance, step=step)  # parameters only: nothing in it trains
    return {"source_bytes": model_bytes(base)["total"], **{f"converted_{k}": v for k, v in model_bytes(converted).items()}}


def run(args) -> int:
    """``jaxeff quantize`` (arguments parsed by jaxeff.cli); errors reach the CLI's one-line handler."""
    report = convert_checkpoint(args.checkpoint, args.out, args.overrides, args.step)
    print(" ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def main(argv=None) -> int:
    """``jaxeff quantize ARGS`` as a function (tests, scripts)."""
    from jaxeff.cli import main as cli_main

    return cli_main(["quantize", *(argv or [])])


if __name__ == "__main__":  # the old spelling, dropped (runpy warned: jaxeff.quant imports this module)
    import sys

    print("error: python -m jaxeff.quant.convert is now: jaxeff quantize (same arguments)", file=sys.stderr)
    raise SystemExit(2)
