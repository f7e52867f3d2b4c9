"""``jaxeff steer-vector``: record a steering vector from a run and two prompt sets into a file
(``jaxeff generate --steer-vector FILE`` adds it). Steering options of ``jaxeff generate`` live in
:mod:`jaxeff.cli` and use :func:`from_args` here. No JAX import at module level."""

from __future__ import annotations

from jaxeff.errors import JaxeffError


def register(sub) -> None:
    s = sub.add_parser("steer-vector", help="save a steering vector (residual-stream difference of two prompt sets)")
    s.add_argument("--checkpoint", required=True, help="run folder or its checkpoints folder")
    s.add_argument("--pos", action="append", required=True, help="prompt to steer toward (repeatable)")
    s.add_argument("--neg", action="append", required=True, help="prompt to steer away from (repeatable)")
    s.add_argument("--layer", type=int, required=True, help="block index: the vector is read after this block")
    s.add_argument("--out", required=True, help="vector file (.npz)")
    s.add_argument("--step", type=int, default=None)
    s.set_defaults(handler=cmd_steer_vector)


def check_args(args, n_layers: int) -> None:
    """Validate the ``--steer-*`` options of ``jaxeff generate`` before any weights are loaded."""
    from jaxeff.steer.vectors import check_layer

    if args.steer_vector and (args.steer_pos or args.steer_neg):
        raise JaxeffError("--steer-vector: give a vector file or --steer-pos/--steer-neg prompts, not both")
    if not args.steer_vector:
        if not args.steer_pos or not args.steer_neg:
            raise JaxeffError("--steer-pos/--steer-neg: steering needs both (or --steer-vector FILE)")
        if args.steer_layer is None:
            raise JaxeffError("--steer-layer: required with --steer-pos/--steer-neg")
    if args.steer_layer is not None:
        check_layer(args.steer_layer, n_layers, "--steer-layer")
    elif args.steer_vector:
        from jaxeff.steer.vectors import load_vector

        check_layer(int(load_vector(args.steer_vector)[1]["layer"]), n_layers, "--steer-vector: its layer")


def wanted(args) -> bool:
    return bool(args.steer_pos or args.steer_neg or args.steer_vector or args.steer_layer is not None)


def from_args(args, model, params, tokenizer, apply_fn):
    """``(vector, layer)`` for ``jaxeff generate``'s steering options (after :func:`check_args`)."""
    from jaxeff.steer.vectors import check_layer, load_vector, record_text

    if args.steer_vector:
        vector, meta = load_vector(args.steer_vector)
        layer = args.steer_layer if args.steer_layer is not None else int(meta["layer"])
        check_layer(layer, model.config.n_layers, "--steer-layer")
        if vector.shape != (model.config.d_model,):
            raise JaxeffError(f"--steer-vector: the vector has {vector.shape[0]} entries but the model's d_model is {model.config.d_model}")
        return vector, layer
    return record_text(model, params, tokenizer, args.steer_pos, args.steer_neg, args.steer_layer, apply_fn), args.steer_layer


def cmd_steer_vector(args) -> int:
    import os
    from pathlib import Path

    from jaxeff.data.tokenizer import check_text

    for text in args.pos:
        check_text(text, "--pos")
    for text in args.neg:
        check_text(text, "--neg")
    out = Path(args.out).absolute()
    if out.is_dir():
        raise JaxeffError(f"--out: '{args.out}' is a folder (expected a file name, e.g. vector.npz)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise JaxeffError(f"--out: cannot write '{args.out}': '{parent}' is not a writable folder")
    import jax

    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.steer.vectors import check_layer, record_text, save_vector
    from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir, one_device_config
    from jaxeff.train.loop import load_params

    ckpt_dir = find_checkpoint_dir(args.checkpoint)
    probe = Checkpointer(ckpt_dir, create=False)
    try:
        saved = probe.read_config(args.step)
    finally:
        probe.close()
    cfg = one_device_config(saved, **{"data.batch_size": 1})
    check_layer(args.layer, cfg.model.n_layers, "--layer")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    trainer, params = load_params(cfg, ckpt_dir, args.step, devices=jax.devices()[:1])
    v = record_text(trainer.model, params, tokenizer, args.pos, args.neg, args.layer, trainer.method.run)
    out = save_vector(args.out, v, layer=args.layer, pos=args.pos, neg=args.neg, run=str(args.checkpoint))
    print(f"steering vector (layer {args.layer}, norm {float(jax.numpy.linalg.norm(v)):.4f}) saved to {out}")
    return 0
