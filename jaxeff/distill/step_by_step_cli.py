"""``jaxeff distill-rationales``: the multi-task data of a step_by_step run (distilling step-by-step).

    jaxeff distill-rationales configs/distill/step_by_step.yaml                      # generator rationales
    jaxeff distill-rationales configs/distill/step_by_step.yaml step_by_step.rationale_source=none   # labels only
    jaxeff train configs/distill/step_by_step.yaml

Writes the config's ``data.paths[0]`` and ``data.eval_paths[0]`` (see jaxeff/distill/step_by_step.py).
No jax at module level: this module is imported for every ``jaxeff`` command. See docs/step_by_step.md.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("distill-rationales", help="write a step_by_step run's label and rationale data "
                                                  "(rationales from the generator or a teacher run)")
    p.add_argument("config", help="the step_by_step run's YAML, e.g. configs/distill/step_by_step.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="e.g. step_by_step.problems=500 "
                                                              "step_by_step.rationale_source=teacher")
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
    print(f"{rec['train_records']} training records ({rec['problems']} problems, rationales: {rec['rationale_source']}) "
          f"written to {rec['train']}, {rec['eval_records']} eval records to {rec['eval']}")
    print(json.dumps(rec))
    return 0
