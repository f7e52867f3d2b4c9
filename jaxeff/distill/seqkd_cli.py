"""``jaxeff distill-generate``: a teacher's outputs as a dataset for sequence-level KD (Kim & Rush 2016).

    jaxeff distill-generate runs/teacher --out data/seqkd.jsonl                  # greedy, prompts from its data
    jaxeff distill-generate runs/teacher --out data/seqkd.jsonl --temperature 0.8 --num 4000 --seed 1
    jaxeff train configs/distill/student_seqkd.yaml data.paths=[data/seqkd.jsonl]

No jax at module level: this module is imported for every ``jaxeff`` command. See docs/seqkd.md.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("distill-generate", help="sample a teacher run's continuations into a dataset file "
                                                "(sequence-level distillation)")
    p.add_argument("teacher", help="teacher run folder (or its checkpoints folder); any method")
    p.add_argument("--out", required=True, help="new .jsonl or .parquet file (records with a 'text' field)")
    p.add_argument("--prompts", default=None, help="a .txt (one prompt per line) or .jsonl ('text' field) file; "
                                                  "default: windows of the teacher's own training documents")
    p.add_argument("--num", type=int, default=None, help="samples (default: one per training document / prompt line)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt window cut from the training "
                                                                  "documents (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=112, help="teacher tokens per sample (default 112)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and sampling")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated together (default 64)")
    p.add_argument("--step", type=int, default=None, help="teacher checkpoint step (default: latest)")
    p.set_defaults(handler=cmd_distill_generate)


def cmd_distill_generate(args) -> int:
    from jaxeff.distill.seqkd import generate_dataset

    rec = generate_dataset(args.teacher, args.out, num=args.num, prompt_tokens=args.prompt_tokens,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           seed=args.seed, batch_size=args.batch_size, prompts=args.prompts, step=args.step)
    print(f"{rec['samples']} samples ({rec['tokens']} tokens, {rec['mean_new_tokens']:.1f} teacher tokens each on "
          f"average) written to {rec['path']}; train a student on it with data.source=files data.paths=[{rec['path']}]")
    print(json.dumps(rec))
    return 0
