"""The distillation family's verbs (registered into ``jaxeff``'s parser by :mod:`jaxeff.cli`, ``FAMILY_CLIS``):

    jaxeff distill-topk configs/distill/student_kd.yaml --k 16 --out runs/teacher_top16.npz   # offline KD (docs/distill.md)
    jaxeff distill-generate runs/teacher --out data/seqkd.jsonl          # sequence-level KD (docs/seqkd.md)
    jaxeff distill-rationales configs/distill/step_by_step.yaml          # distilling step-by-step (docs/step_by_step.md)

No jax at module level: this module is imported for every ``jaxeff`` command.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    _register_topk(sub)
    _register_seqkd(sub)
    _register_step_by_step(sub)


# ----------------------------------------------------------------------------------------------
# distill-topk (offline top-k logits)


def _register_topk(sub) -> None:
    dk = sub.add_parser("distill-topk", help="precompute a teacher's top-k logits for offline distillation")
    dk.add_argument("config", help="the distill run's YAML (teacher, data, model), e.g. configs/distill/student_kd.yaml")
    dk.add_argument("overrides", nargs="*", default=[])
    dk.add_argument("--k", type=int, default=16, help="logits kept per position (default 16)")
    dk.add_argument("--out", required=True, help="the .npz file to write, e.g. runs/teacher_top16.npz")
    dk.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    dk.set_defaults(handler=cmd_distill_topk)


def cmd_distill_topk(args) -> int:
    from jaxeff.distill.offline import run

    return run(args)


# ----------------------------------------------------------------------------------------------
# distill-generate (sequence-level KD, Kim & Rush 2016)


def _register_seqkd(sub) -> None:
    p = sub.add_parser("distill-generate", help="sample a teacher run's continuations into a dataset file (sequence-level distillation)")
    p.add_argument("teacher", help="teacher run folder (or its checkpoints folder); any method")
    p.add_argument("--out", required=True, help="new .jsonl or .parquet file (records with a 'text' field)")
    p.add_argument(
        "--prompts",
        default=None,
        help="a .txt (one prompt per line) or .jsonl ('text' field) file; default: windows of the teacher's own training documents",
    )
    p.add_argument("--num", type=int, default=None, help="samples (default: one per training document / prompt line)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt window cut from the training documents (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=112, help="teacher tokens per sample (default 112)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and sampling")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated together (default 64)")
    p.add_argument("--step", type=int, default=None, help="teacher checkpoint step (default: latest)")
    p.set_defaults(handler=cmd_distill_generate)


def cmd_distill_generate(args) -> int:
    from jaxeff.distill.seqkd import generate_dataset

    rec = generate_dataset(
        args.teacher,
        args.out,
        num=args.num,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        prompts=args.prompts,
        step=args.step,
    )
    print(
        f"{rec['samples']} samples ({rec['tokens']} tokens, {rec['mean_new_tokens']:.1f} teacher tokens each on "
        f"average) written to {rec['path']}; train a student on it with data.source=files data.paths=[{rec['path']}]"
    )
    print(json.dumps(rec))
    return 0


# ----------------------------------------------------------------------------------------------
# distill-rationales (distilling step-by-step, Hsieh et al. 2023)


def _register_step_by_step(sub) -> None:
    p = sub.add_parser("distill-rationales", help="write a step_by_step run's label and rationale data (rationales from the generator or a teacher run)")
    p.add_argument("config", help="the step_by_step run's YAML, e.g. configs/distill/step_by_step.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="e.g. step_by_step.problems=500 step_by_step.rationale_source=teacher")
    p.add_argument("--force", action="store_true", help="overwrite existing data files")
    p.set_defaults(handler=cmd_distill_rationales)


def cmd_distill_rationales(args) -> int:
    from jaxeff.config import load_config
    from jaxeff.distill.step_by_step import write_data
    from jaxeff.errors import ConfigError

    cfg = load_config(args.config, list(args.overrides))
    if cfg.method != "step_by_step":
        raise ConfigError(f"method: distill-rationales writes the data of a step_by_step run (got method {cfg.method})")
    rec = write_data(cfg, force=args.force)
    print(
        f"{rec['train_records']} training records ({rec['problems']} problems, rationales: {rec['rationale_source']}) "
        f"written to {rec['train']}, {rec['eval_records']} eval records to {rec['eval']}"
    )
    print(json.dumps(rec))
    return 0
