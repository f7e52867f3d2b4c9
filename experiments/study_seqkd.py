"""Study: sequence-level vs token-level distillation (Kim & Rush 2016) at equal student compute.

1. pretrain a teacher (configs/distill/teacher.yaml) on the embedded synthetic corpus;
2. ``jaxeff distill-generate``: the teacher's greedy continuations (``--new-tokens``) of one
   ``--prompt-tokens`` window of each of its training documents, written as a .jsonl dataset;
3. train the half-depth student four ways, same steps, batch, sequence length, optimizer and seed
   (equal student compute; the teacher's cost differs: a forward per step for token-level KD, one
   generation pass for sequence-level KD):
   (a) ``alone``: method lm on the real corpus (student_alone.yaml);
   (b) ``word_kd``: method distill on the real corpus (student_kd.yaml: 0.5 CE + 0.5 KL, T = 1);
   (c) ``seq_kd``: method lm on the teacher's generations (student_seqkd.yaml, data.paths);
   (d) ``seq_word_kd``: method distill on the teacher's generations (the paper's combination);
4. evaluate every student (and the teacher) on the real eval sets: loss per domain, and greedy
   decoding of ``--eval-new`` tokens from ``--eval-prompts`` held-out windows of the eval documents:
   * ``ref match``: share of the reference continuation reproduced before the first wrong token;
   * ``arithmetic accuracy``: the greedy answer after ``=`` of ``--problems`` held-out arithmetic
     lines (32 characters of context) equals the true result;
   * ``teacher match``: share of the teacher's greedy continuation reproduced before the first
     difference (the paper's observation: the seq-KD student imitates the teacher's mode);
5. print one table and the verdict on the claim (on ref match, paired over the held-out prompts,
   against 2 standard errors):
   sequence-level KD gives a student whose greedy output is better than word-level KD's (paper: +BLEU with greedy decoding, while its perplexity on
   real data is worse), at equal student compute.

TensorBoard: <run-dir>/seqkd_study[_quick]/{teacher, alone, word_kd, seq_kd, seq_word_kd}: each run's
training curves, plus ``seqkd/ref_match``, ``seqkd/teacher_match`` and ``seqkd/real_eval_loss`` at the
last step. The study owns that folder: it is deleted and rewritten on every run.

    python experiments/study_seqkd.py --quick     # ~3.5 minutes on a shared 2-core CPU
    python experiments/study_seqkd.py             # the configs' sizes
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time

from _common import REPO, add_study_args, quick_data, quick_docs, quick_model, study_dir, train_run, train_steps

CONFIGS = REPO / "configs" / "distill"
QUICK = quick_model() + quick_data(docs_per_domain=None, eval_batches=2)
QUICK_DATA = quick_docs(300)  # the real corpus (the sequence-level students train on the teacher's samples)


def held_out(data_cfg, tokenizer, n: int, prompt_tokens: int, new: int, seed: int = 1234):
    """``(prompts [n, prompt_tokens], references [n, new])``: windows of the eval documents."""
    import numpy as np

    from jaxeff.data.synthetic import generate_documents
    from jaxeff.train.inputs import EVAL_SEED_OFFSET

    docs = [
        d
        for name in data_cfg.domains
        for d in generate_documents(name, data_cfg.eval_docs_per_domain, data_cfg.seed + EVAL_SEED_OFFSET, doc_len=data_cfg.doc_len)
    ]
    rng = np.random.default_rng(seed)
    prompts, refs = [], []
    for i in range(n):
        ids = [tokenizer.bos_id] + tokenizer.encode(docs[i % len(docs)])
        s = int(rng.integers(0, len(ids) - prompt_tokens - new + 1))
        prompts.append(ids[s : s + prompt_tokens])
        refs.append(ids[s + prompt_tokens : s + prompt_tokens + new])
    return np.asarray(prompts, np.int32), np.asarray(refs, np.int32)


def arithmetic_problems(data_cfg, tokenizer, n: int, context: int):
    """``(prompts [n, context], answers)``: the last ``context`` characters up to and including an
    ``=`` of the arithmetic eval documents (byte tokens: one per character), and the true result
    after it (up to the newline)."""
    import numpy as np

    from jaxeff.data.synthetic import generate_documents
    from jaxeff.train.inputs import EVAL_SEED_OFFSET

    docs = generate_documents("arithmetic", data_cfg.eval_docs_per_domain, data_cfg.seed + EVAL_SEED_OFFSET, doc_len=data_cfg.doc_len)
    spots = [(d, e) for d in docs for e in range(context, len(d)) if d[e] == "=" and "\n" in d[e:]]
    order = np.random.default_rng(0).permutation(len(spots))[:n]
    prompts, answers = [], []
    for i in order:
        d, e = spots[i]
        ids = tokenizer.encode(d[e - context + 1 : e + 1])
        if len(ids) != context:
            raise SystemExit("arithmetic accuracy needs the byte tokenizer (one token per character)")
        prompts.append(ids)
        answers.append(d[e + 1 : d.index("\n", e)])
    return np.asarray(prompts, np.int32), answers


def prefix_rows(a, b):
    """Per row: (length of the common prefix of a and b) / width."""
    import numpy as np

    same = np.cumprod(np.asarray(a) == np.asarray(b), axis=1)
    return same.sum(1) / a.shape[1]


def prefix_match(a, b):
    """Mean over rows of :func:`prefix_rows`."""
    return float(prefix_rows(a, b).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap, "seqkd", "small models, few steps (a few CPU minutes)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="default 1000; --quick 600")
    ap.add_argument("--student-steps", type=int, default=None, help="default 300; --quick 200")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="teacher tokens per sample (default 112; --quick 48)")
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--eval-new", type=int, default=24)
    ap.add_argument("--problems", type=int, default=300, help="held-out arithmetic problems for answer accuracy")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from tensorboardX import SummaryWriter

    from jaxeff.config import load_config
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.distill.seqkd import generate_dataset
    from jaxeff.models import Transformer
    from jaxeff.models.generate import generate
    from jaxeff.runs import load_model_params
    from jaxeff.train.inputs import build_data
    from jaxeff.train.runtime import Trainer

    study = study_dir(args)
    shutil.rmtree(study, ignore_errors=True)
    t_steps = args.teacher_steps or (600 if args.quick else 1000)
    s_steps = args.student_steps or (200 if args.quick else 300)
    new_tokens = args.new_tokens or (48 if args.quick else 112)
    size = QUICK if args.quick else []
    common = [f"logging.run_dir={study}", "logging.progress=false", *size]
    real = QUICK_DATA if args.quick else []

    def train(name, yaml_name, overrides):
        cfg, _, wall = train_run(CONFIGS / yaml_name, [f"name={name}", *common, *overrides])
        return cfg, wall

    t_cfg, t_wall = train("teacher", "teacher.yaml", [*real, *train_steps(t_steps)])
    print(f"teacher: {t_steps} steps in {t_wall:.0f} s", flush=True)
    data = study / "data" / "teacher_greedy.jsonl"
    t0 = time.perf_counter()
    gen = generate_dataset(t_cfg.run_path, data, prompt_tokens=args.prompt_tokens, max_new_tokens=new_tokens)
    gen_wall = time.perf_counter() - t0
    print(f"distill-generate: {gen['samples']} samples, {gen['tokens']} tokens in {gen_wall:.0f} s", flush=True)

    s_common = train_steps(s_steps)
    on_gen = ["data.source=files", f"data.paths=[{data}]", "data.eval_fraction=0.05"]
    kd = [f"distill.teacher_checkpoint={t_cfg.run_path}"]
    students = {}
    for name, yaml_name, extra in (
        ("alone", "student_alone.yaml", real),
        ("word_kd", "student_kd.yaml", [*real, *kd]),
        ("seq_kd", "student_seqkd.yaml", on_gen),
        ("seq_word_kd", "student_kd.yaml", [*on_gen, *kd]),
    ):
        cfg, wall = train(name, yaml_name, [*s_common, *extra])
        students[name] = (cfg, wall)
        print(f"{name}: {s_steps} steps in {wall:.0f} s", flush=True)

    # evaluation on the real corpus
    _, _, eval_sets = build_data(t_cfg.data, t_cfg.model.vocab_size)
    tokenizer = load_tokenizer(t_cfg.data.tokenizer)
    prompts, refs = held_out(t_cfg.data, tokenizer, args.eval_prompts, args.prompt_tokens, args.eval_new)
    problems, answers = arithmetic_problems(t_cfg.data, tokenizer, args.problems, 32)

    def greedy(cfg, params, x=None, new=None):
        model = Transformer(cfg.model)
        x = prompts if x is None else x
        return np.asarray(jax.jit(lambda p, x: generate(model, p, x, jax.random.PRNGKey(0), max_new_tokens=new or args.eval_new))(params, x))

    def accuracy(cfg, params):
        out = greedy(cfg, params, problems, 8)
        got = [tokenizer.decode(row).split("\n")[0] for row in out]
        return float(np.mean([g == a for g, a in zip(got, answers)]))

    def real_eval(run):
        cfg, params = load_model_params(run)
        ev_cfg = load_config(CONFIGS / "student_alone.yaml", [*common, *real, f"logging.run_dir={study / '_eval'}", "mesh.data=1"]).to_dict()
        ev_cfg["model"] = cfg.to_dict()["model"]
        from jaxeff.config import from_dict

        trainer = Trainer(from_dict(ev_cfg), devices=jax.devices()[:1])
        return cfg, params, trainer.evaluate(params, eval_sets, t_cfg.train.eval_batches)

    t_model_cfg, t_params, t_eval = real_eval(t_cfg.run_path)
    t_out = greedy(t_model_cfg, t_params)
    rows = [
        {
            "name": "teacher",
            "layers": t_cfg.model.n_layers,
            "eval": t_eval,
            "ref": prefix_match(t_out, refs),
            "teacher": 1.0,
            "acc": accuracy(t_model_cfg, t_params),
            "wall": t_wall,
            "steps": t_steps,
            "data": "real",
        }
    ]
    for name, (cfg, wall) in students.items():
        m_cfg, params, ev = real_eval(cfg.run_path)
        out = greedy(m_cfg, params)
        row = {
            "name": name,
            "layers": cfg.model.n_layers,
            "eval": ev,
            "ref": prefix_match(out, refs),
            "ref_rows": prefix_rows(out, refs),
            "teacher": prefix_match(out, t_out),
            "acc": accuracy(m_cfg, params),
            "wall": wall,
            "steps": s_steps,
            "data": "teacher's" if cfg.data.source == "files" else "real",
        }
        rows.append(row)
        with SummaryWriter(str(cfg.run_path)) as w:
            w.add_scalar("seqkd/ref_match", row["ref"], s_steps)
            w.add_scalar("seqkd/arithmetic_accuracy", row["acc"], s_steps)
            w.add_scalar("seqkd/teacher_match", row["teacher"], s_steps)
            w.add_scalar("seqkd/real_eval_loss", ev["eval/loss"], s_steps)
    shutil.rmtree(study / "_eval", ignore_errors=True)

    domains = sorted(k.split("/")[-1] for k in t_eval if k.startswith("eval/loss/"))
    print()
    print(
        f"{datetime.date.today()}, {jax.devices()[0].device_kind}; runs in {study}; teacher data: {gen['samples']} "
        f"greedy continuations ({args.prompt_tokens}-token prompts + {new_tokens} new tokens, "
        f"{gen['tokens']} tokens; generated in {gen_wall:.0f} s); students: {s_steps} steps x "
        f"{t_cfg.data.batch_size} x {t_cfg.data.seq_len} tokens each; greedy eval: {args.eval_prompts} held-out "
        f"{args.prompt_tokens}-token prompts, {args.eval_new} new tokens"
    )
    print("| run | data | layers | steps | " + " | ".join(domains) + " | real eval loss | arithmetic accuracy | ref match | teacher match | wall (s) |")
    print("|---" * (len(domains) + 9) + "|")
    for r in rows:
        print(
            f"| {r['name']} | {r['data']} | {r['layers']} | {r['steps']} | "
            + " | ".join(f"{r['eval'][f'eval/loss/{d}']:.3f}" for d in domains)
            + f" | **{r['eval']['eval/loss']:.3f}** | {r['acc']:.3f} | {r['ref']:.3f} | {r['teacher']:.3f} | "
            f"{r['wall']:.0f} |"
        )
    by = {r["name"]: r for r in rows}
    s, w, a = by["seq_kd"], by["word_kd"], by["alone"]
    print()
    print(
        "ref match: share of the true continuation reproduced by greedy decoding before the first wrong token; "
        "teacher match: the same against the teacher's greedy continuation"
    )
    d_rows = s["ref_rows"] - w["ref_rows"]  # paired over the same held-out prompts
    diff, se = float(d_rows.mean()), float(d_rows.std(ddof=1) / np.sqrt(len(d_rows)))
    verdict = "HELD" if diff > 2 * se else "DID NOT HOLD" if diff < -2 * se else "NOT RESOLVED (within 2 standard errors)"
    print(f"arithmetic accuracy: the greedy answer after '=' equals the true result, {len(answers)} held-out problems with 32 characters of context")
    print(
        f"claim (Kim & Rush): at equal student compute, sequence-level KD gives better greedy output than "
        f"word-level KD (judged on ref match, paired over {len(d_rows)} prompts): {verdict} -- ref match "
        f"{s['ref']:.4f} (seq_kd) vs {w['ref']:.4f} (word_kd), difference {diff:+.4f} +- {se:.4f} (1 s.e.); alone "
        f"{a['ref']:.4f}, seq + word {by['seq_word_kd']['ref']:.4f}, teacher {by['teacher']['ref']:.4f}; arithmetic "
        f"accuracy {s['acc']:.3f} vs {w['acc']:.3f} (teacher {by['teacher']['acc']:.3f})"
    )
    print(
        f"  the seq-KD student imitates the teacher's mode: teacher match {s['teacher']:.3f} (seq_kd) vs "
        f"{w['teacher']:.3f} (word_kd), {a['teacher']:.3f} (alone), {by['seq_word_kd']['teacher']:.3f} (seq + word)"
    )
    print(
        f"  real-data eval loss (the paper: seq-KD's perplexity is worse): seq_kd {s['eval']['eval/loss']:.3f}, "
        f"word_kd {w['eval']['eval/loss']:.3f}, alone {a['eval']['eval/loss']:.3f}, seq + word "
        f"{by['seq_word_kd']['eval']['eval/loss']:.3f}"
    )
    return rows


if __name__ == "__main__":
    main()
