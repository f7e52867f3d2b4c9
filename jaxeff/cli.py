"""``jaxeff train | eval | generate``: the command-line entry points.

A mistake in the user's input (config, files, shapes, checkpoints) prints one line
``error: ...`` on stderr and exits with code 2; nothing is written before the input is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import sys
import threading

from jaxeff.errors import JaxeffError

EXIT_USAGE = 2
EXIT_HALTED = 3  # the non-finite guard stopped training (last good state checkpointed)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: checkpointed at the current step


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: jaxeff generate: <what> (see jaxeff generate --help)``
    instead of the usage block; exit code 2 as always. Subparsers inherit it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxeff", description="Efficient transformer LM training and inference in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML experiment config")
    t.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=3e-4 model.n_layers=4")
    t.add_argument("--resume", action="store_true", help="same as resume=true")

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", default=None, help="run folder or its checkpoints folder (or --medusa RUN)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step", type=int, default=None)
    g.add_argument("--attention-impl", default=None, choices=["auto", "xla", "cudnn", "pallas"])
    g.add_argument(
        "--steer-pos",
        action="append",
        default=[],
        metavar="TEXT",
        help="activation addition: prompt to steer toward (repeatable; with --steer-neg, --steer-layer)",
    )
    g.add_argument("--steer-neg", action="append", default=[], metavar="TEXT", help="prompt to steer away from")
    g.add_argument("--steer-layer", type=int, default=None, metavar="L", help="add the vector to the residual stream after block L (0-based)")
    g.add_argument("--steer-scale", type=float, default=1.0, metavar="S", help="multiplier of the vector (default 1)")
    g.add_argument("--steer-vector", default=None, metavar="FILE", help="a vector saved by 'jaxeff steer-vector'")
    from jaxeff.decode.medusa_cli import add_generate_args

    add_generate_args(g)  # --medusa RUN, --medusa-top-k, --compare

    c = sub.add_parser("convert", help="Hugging Face folder <-> run folder (see docs/interop.md)")
    c.add_argument("--from-hf", dest="from_hf", help="Hugging Face model folder (without --out: print its model section)")
    c.add_argument("--out", help="new run folder for --from-hf")
    c.add_argument("--from", dest="from_run", help="run folder (or its checkpoints folder) to export")
    c.add_argument("--to-hf", dest="to_hf", help="new Hugging Face folder for --from")
    c.add_argument("--step", type=int, default=None)
    c.add_argument("--dtype", default=None, help="float32 | bfloat16 (| float16 for --to-hf); default: as stored")
    cf = sub.add_parser("config", help="show a resolved config, or the keys a config accepts")
    cs = cf.add_subparsers(dest="config_command", required=True)
    show = cs.add_parser("show", help="print the resolved YAML (bases composed, overrides applied, defaults filled)")
    show.add_argument("config", help="YAML experiment file")
    show.add_argument("overrides", nargs="*", default=[])
    show.add_argument("--changed", action="store_true", help="only the keys that differ from the schema defaults")
    fields = cs.add_parser("fields", help="every key with its type, default and help")
    fields.add_argument("section", nargs="?", default=None, help="a section (e.g. optim, model, quant.convert)")
    cf.set_defaults(handler=cmd_config)
    for module in FAMILY_CLIS:
        importlib.import_module(module).register(sub)
    return p


# Verbs of the method families, each in its family's own module: ``register(sub)`` adds its parsers
# and sets ``handler`` (``handler(args) -> exit code``) with ``set_defaults``. Keep these modules
# light to import (no jax at module level): they load for every command.
FAMILY_CLIS = (
    "jaxeff.evals",
    "jaxeff.peft.cli",
    "jaxeff.quant.cli",
    "jaxeff.prune.cli",
    "jaxeff.distill.cli",
    "jaxeff.edit.cli",
    "jaxeff.steer.cli",
    "jaxeff.decode.cli",
)


def cmd_train(args) -> int:
    from jaxeff.config import load_config
    from jaxeff.train.loop import run_training, setup_distributed

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    setup_distributed(cfg)
    result = run_training(cfg)
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items() if k.startswith("eval/loss") or k in ("train/loss", "step")}
    print(json.dumps(summary))
    if result.get("halted"):
        print(f"error: {result['halted']}", file=sys.stderr)
        return EXIT_HALTED
    return EXIT_INTERRUPTED if result.get("stopped_early") else 0


def eval_config(saved: dict, yaml_path=None, overrides=()) -> "ExperimentConfig":  # noqa: F821
    """The config ``jaxeff eval`` uses: the run's saved config (data parallel over the devices), its
    ``data`` section and ``train.eval_batches`` (and the mesh keys it sets) replaced by those of
    ``yaml_path`` when given, then dotted ``overrides``
    (data / eval settings). A run that records no data of its own (converted from Hugging Face)
    needs a YAML or ``data.*`` overrides."""
    from jaxeff.config import parse_overrides, provenance_of, resolve_raw
    from jaxeff.train.checkpoint import one_device_config

    changes: dict = {}
    given = False
    if yaml_path is not None:
        raw = resolve_raw(yaml_path)
        changes["data"] = raw.get("data", {})
        if isinstance(raw.get("mesh"), dict):  # how to lay the model out for eval (e.g. fsdp), as before
            changes.update({f"mesh.{k}": v for k, v in raw["mesh"].items()})
        if isinstance(raw.get("train"), dict) and "eval_batches" in raw["train"]:
            changes["train.eval_batches"] = raw["train"]["eval_batches"]
        given = True
    for key, value in parse_overrides(list(overrides)):
        changes[key] = value
        given = given or key.startswith("data.")
    prov = provenance_of(saved)
    if prov.get("data") == "unknown" and not given:
        raise JaxeffError(
            f"eval: the run records no data of its own ({prov.get('command', 'converted')} from "
            f"{prov.get('source', '?')}); give a YAML whose data section to evaluate, "
            "e.g. jaxeff eval configs/quickstart.yaml --checkpoint RUN"
        )
    return one_device_config(saved, **changes)


def cmd_config(args) -> int:
    from jaxeff.config import ExperimentConfig, from_dict, resolve_raw

    if args.config_command == "show":
        import yaml

        cfg = from_dict(resolve_raw(args.config, list(args.overrides)))
        tree = cfg.to_dict()
        if args.changed:
            from jaxeff.config_fields import changed_keys

            tree = changed_keys(tree, ExperimentConfig().to_dict())
        print(yaml.safe_dump(tree, sort_keys=False), end="")
        return 0
    from jaxeff.config_fields import field_rows

    rows = field_rows(ExperimentConfig, args.section)
    width = max(len(r[0]) for r in rows)
    twidth = min(max(len(r[1]) for r in rows), 40)
    for key, typ, default, help_ in rows:
        print(f"{key:{width}s}  {typ:{twidth}s}  {default:12s}  {help_}".rstrip())
    return 0


def cmd_generate(args) -> int:
    if args.medusa:
        from jaxeff.decode.medusa_cli import cmd_generate_medusa

        return cmd_generate_medusa(args)
    if not args.checkpoint:
        raise JaxeffError("--checkpoint: required (or --medusa RUN for Medusa decoding)")
    import jax
    import numpy as np

    from jaxeff.data.tokenizer import check_text, load_tokenizer
    from jaxeff.models.generate import check_sampling, check_seed, generate
    from jaxeff.runs import read_config
    from jaxeff.train.checkpoint import find_checkpoint_dir, one_device_config
    from jaxeff.train.loop import load_params

    if args.max_new_tokens < 1:
        raise JaxeffError(f"--max-new-tokens: expected a positive number (got {args.max_new_tokens})")
    check_text(args.prompt, "--prompt")
    for name in ("steer_pos", "steer_neg"):
        for text in getattr(args, name):
            check_text(text, f"--{name.replace('_', '-')}")
    check_sampling(args.temperature, args.top_k, None)  # the vocabulary bound once the config is read
    check_seed(args.seed)
    if not math.isfinite(args.steer_scale):
        raise JaxeffError(f"--steer-scale: expected a finite number (got {args.steer_scale})")
    ckpt_dir = find_checkpoint_dir(args.checkpoint)
    changes = {"data.batch_size": 1}
    if args.attention_impl:
        changes["model.attention_impl"] = args.attention_impl
    cfg = one_device_config(read_config(ckpt_dir, args.step), **changes)
    check_sampling(args.temperature, args.top_k, cfg.model.vocab_size)
    from jaxeff.steer import cli as steer_cli

    steering = steer_cli.wanted(args)
    if steering:
        steer_cli.check_args(args, cfg.model.n_layers)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    total = len(ids) + args.max_new_tokens
    if total > cfg.model.max_seq_len:
        raise JaxeffError(
            f"--prompt/--max-new-tokens: {len(ids)} prompt + {args.max_new_tokens} new tokens exceed the model's max_seq_len={cfg.model.max_seq_len}"
        )
    trainer, params = load_params(cfg, ckpt_dir, args.step, devices=jax.devices()[:1])
    if steering:
        from jaxeff.steer import steer_generate

        vector, layer = steer_cli.from_args(args, trainer.model, params, tokenizer, trainer.method.run)
        new = steer_generate(
            trainer.model,
            params,
            np.asarray([ids], np.int32),
            jax.random.PRNGKey(args.seed),
            vector=vector,
            layer=layer,
            scale=args.steer_scale,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            apply_fn=trainer.method.run,
        )
    else:
        new = generate(
            trainer.model,
            params,
            np.asarray([ids], np.int32),
            jax.random.PRNGKey(args.seed),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            apply_fn=trainer.method.run,
        )
    new = [int(t) for t in np.asarray(new)[0]]
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new))
    return 0


def cmd_convert(args) -> int:
    from jaxeff.interop.convert import main as convert

    return convert(args)


def _sigterm_exits(signum, frame):
    """SIGTERM outside the training loop (whose own handler checkpoints first): exit at once with
    code 130, as the default action would but with the interrupted code instead of -15. Not an
    exception: raised inside an import of a compiled module it can abort the interpreter."""
    try:
        sys.stdout.flush()
    except Exception:  # e.g. the signal came in the middle of a write to stdout
        pass
    os.write(2, b"interrupted (SIGTERM)\n")
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # SIGTERM before training's own handler is installed (imports, data, restore, first eval) and
    # after it is put back exits 130 like Ctrl-C, rather than dying by the signal (-15).
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _sigterm_exits)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `jaxeff config fields | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is _sigterm_exits:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --options too
    if extra:
        bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if bad:  # named by the verb's own parser, whose --help lists its options
            verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            verbs[args.command].error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    handler = getattr(args, "handler", None) or {"train": cmd_train, "generate": cmd_generate, "convert": cmd_convert}[args.command]
    try:
        return handler(args)
    except JaxeffError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
