"""Study: what do int8 / int4 / NF4 / W8A8 / ternary cost in eval loss, with PTQ and with QAT?

1. train a small float model on the embedded synthetic corpus (configs/quickstart.yaml, smaller);
2. from it, fine-tune for the same number of extra steps (a) in float (the control: more training
   alone), (b) with QAT int4 weights (symmetric, per group of 64: the int4 kernel's grid) and
   (c) with QAT ternary weights (BitNet b1.58 absmean, per tensor; weight-only so that the trained
   model runs on the int4 kernel exactly);
3. convert each model to real quantized weights (``jaxeff.quant.convert``: the attention/MLP
   projections become ``QuantizedWeight`` leaves; embeddings and norms stay float) and evaluate it
   through ``Method.run`` of method ``quantized`` — the same path as ``jaxeff eval``; the
   fake-quantized rows (PTQ ternary, static W8A8) run through method ``qat``'s fake quantization;
4. print one table: eval loss (mean over the corpus's domains), its change from float, and the bytes
   of the projections and of the whole model. The claim: QAT int4 reaches a lower eval loss than PTQ int4.

Matmul backend: ``reference`` (pure jnp dequantize-then-matmul; the Pallas kernels in interpret mode
are far too slow on CPU and compute the same numbers — tests/jaxeff/test_quant_methods.py checks
that). Speed needs a GPU: see experiments/bench_quant.py.

TensorBoard: the training runs and one run per table row land in <run-dir>/quant_study[_quick]/
(deleted and rewritten on every run).

    python experiments/study_quant.py --quick        # < 3 min on a 2-core CPU
    python experiments/study_quant.py                # quickstart size
    python experiments/study_quant.py --seed 1       # another initialisation (runs/quant_study_seed1)
    tensorboard --logdir runs/quant_study_quick
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path

import jax

from jaxeff.config import load_config
from jaxeff.quant.convert import model_bytes
from jaxeff.quant.intercept import dense_paths, get_path
from jaxeff.train.checkpoint import Checkpointer, find_checkpoint_dir
from jaxeff.train.inputs import build_data
from jaxeff.train.loop import Trainer, load_params

from _common import REPO, add_study_args, quick_overrides, study_dir, train_run, train_steps

QUICK = quick_overrides(n_layers=2, max_seq_len=None, eval_batches=2)
PROJ = r"^layers_\d+/(attn|mlp)/"


def train(base: list[str], name: str, steps: int, extra: list[str], run_dir: Path) -> Path:
    run = train_run(
        REPO / "configs" / "quickstart.yaml", base + [f"name={name}", f"logging.run_dir={run_dir}", *train_steps(steps), "logging.progress=false"] + extra
    )
    print(f"  trained {name}: {steps} steps in {run.wall_s:.0f}s, eval loss {run.out['eval/loss']:.4f}", flush=True)
    return run.path


def model_params_of(run_path: Path, overrides: list[str]):
    """The model parameters a run's checkpoint stands for (QAT: its quantize-dequantize weights)."""
    ckpt_dir = find_checkpoint_dir(run_path)
    probe = Checkpointer(ckpt_dir, create=False)
    saved = probe.read_config()
    probe.close()
    from jaxeff.config import from_dict

    trainer, params = load_params(from_dict(saved), ckpt_dir)
    return jax.device_get(trainer.method.model_params(params))


def evaluate(base: list[str], method_overrides: list[str], params, eval_sets, batches: int):
    """Eval loss of ``params`` (float model parameters) under a method: ``quantized`` converts them
    (prepare_params) and runs the kernels; ``lm`` / ``qat`` run float / fake quantization."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", base + method_overrides)
    trainer = Trainer(cfg)
    state = trainer.init_state(params)
    loss = trainer.evaluate(state.params, eval_sets, batches)["eval/loss"]
    sizes = model_bytes(jax.device_get(state.params))
    return loss, sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(
        p, "quant", "small model, few steps (< 3 min on 2 CPU cores)", run_dir="runs", run_dir_help="runs go to <run-dir>/quant_study[_quick][_seed<N>]/"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model initialisation seed of the whole pipeline (same data and eval set); run folders get a _seedN suffix when not 0",
    )
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    run_dir = study_dir(args, tag=f"_seed{args.seed}" if args.seed else "")
    shutil.rmtree(run_dir, ignore_errors=True)
    base = (list(QUICK) if args.quick else []) + [f"seed={args.seed}"]
    float_steps, ft_steps = (200, 60) if args.quick else (300, 100)
    ft = ["optim.lr=1e-3", "optim.warmup_steps=5"]

    print(f"1. float model ({float_steps} steps)", flush=True)
    float_run = train(base, "float", float_steps, [], run_dir)
    init = [f"train.init_from={float_run}"]
    print(f"2. fine-tuning {ft_steps} steps from it: float control, QAT int4, QAT ternary", flush=True)
    control_run = train(base, "float_continued", ft_steps, init + ft, run_dir)
    int4 = ["method=qat", "quant.weight.bits=4", "quant.weight.granularity=group", "quant.weight.group_size=64"]
    qat4_run = train(base, "qat_int4", ft_steps, init + ft + int4, run_dir)
    tern = ["method=qat", "quant.weight.ternary=true", "quant.weight.granularity=tensor"]
    qatt_run = train(base, "qat_ternary", ft_steps, init + ft + tern, run_dir)

    cfg = load_config(REPO / "configs" / "quickstart.yaml", base)
    _, loader, eval_sets = build_data(cfg.data, cfg.model.vocab_size)
    batches = cfg.train.eval_batches
    float_p = model_params_of(float_run, base)
    control_p = model_params_of(control_run, base)
    qat4_p = model_params_of(qat4_run, base)
    qatt_p = model_params_of(qatt_run, base)

    conv = lambda fmt, *more: ["method=quantized", f"quant.convert.format={fmt}", "quant.convert.backend=reference", *more]
    calib = [loader.next_batch()["inputs"] for _ in range(8)]
    rows = []  # (name, how it runs, params, method overrides)
    rows.append(("float", "float32", float_p, []))
    rows.append((f"float +{ft_steps} steps (control)", "float32", control_p, []))
    rows.append(("PTQ int8 (per channel)", "kernel int8", float_p, conv("int8")))
    rows.append(("PTQ int4 (group 64)", "kernel int4", float_p, conv("int4", "quant.convert.group_size=64")))
    rows.append(("PTQ NF4 (block 64)", "kernel nf4", float_p, conv("nf4")))
    rows.append(("PTQ NF4 + double quant", "kernel nf4", float_p, conv("nf4", "quant.convert.double_quant=true")))
    rows.append(("PTQ W8A8", "int8_matmul", float_p, conv("w8a8")))
    rows.append(("PTQ W8A8 + outliers >= 6", "int8_matmul", float_p, conv("w8a8", "quant.convert.outlier_threshold=6.0")))
    rows.append(("PTQ ternary", "fake quant", float_p, tern))
    rows.append((f"PTQ int4 of float +{ft_steps}", "kernel int4", control_p, conv("int4", "quant.convert.group_size=64")))
    rows.append((f"PTQ ternary of float +{ft_steps}", "fake quant", control_p, tern))
    rows.append((f"QAT int4 ({ft_steps} steps)", "kernel int4", qat4_p, conv("int4", "quant.convert.group_size=64")))
    rows.append((f"QAT ternary ({ft_steps} steps)", "kernel int4", qatt_p, conv("int4", "quant.convert.group_size=64")))

    from tensorboardX import SummaryWriter

    results = []
    for name, how, params, overrides in rows:
        loss, sizes = evaluate(base, overrides, params, eval_sets, batches)
        proj = sizes["quantized"] or sum(get_path(params, p)["kernel"].nbytes for p in dense_paths(params, PROJ))
        if how == "fake quant":  # ternary codes on the int4 grid: the bytes the int4 kernel would store
            proj = None
        results.append((name, how, loss, proj, sizes["total"] if how != "fake quant" else None))
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        w = SummaryWriter(str(run_dir / "table" / slug))
        w.add_scalar("eval/loss", loss, 0)
        if proj:
            w.add_scalar("model/projection_bytes", proj, 0)
        w.close()
        print(f"  {name}: {loss:.4f}", flush=True)

    # W8A8 static: per-tensor activation scales calibrated (min/max) on 8 training batches, fake quant
    from jaxeff.quant.ptq import calibrate

    st_cfg = load_config(REPO / "configs" / "quickstart.yaml", base + ["method=qat", "quant.activation.bits=8", "quant.weight.bits=8"])
    st_trainer = Trainer(st_cfg)
    ranges = calibrate(st_trainer.model, float_p, calib, st_cfg.quant)
    from jaxeff.quant.qat import fake_quant_apply
    from jaxeff.train.losses import cross_entropy

    @jax.jit
    def static_loss(params, batch):
        out = fake_quant_apply(
            st_trainer.model, params, batch["inputs"], st_cfg.quant, act_ranges=ranges, positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        return cross_entropy(out.logits, batch["targets"], batch["loss_mask"])

    from jaxeff.data.loader import eval_batches
    import numpy as np

    per_domain = []
    for arrays in eval_sets.values():
        tot = n = 0.0
        for i, b in enumerate(eval_batches(arrays, cfg.data.batch_size)):
            if i >= batches:
                break
            l, c = static_loss(float_p, {k: jax.numpy.asarray(v) for k, v in b.items()})
            tot, n = tot + float(l) * float(c), n + float(c)
        per_domain.append(tot / n)
    results.insert(8, ("PTQ W8A8 static (min/max calib.)", "fake quant", float(np.mean(per_domain)), None, None))

    f_loss = results[0][2]
    f_proj = results[0][3]
    date = datetime.date.today().isoformat()
    print(
        f"\nQuantization study ({'quick' if args.quick else 'full'}), {date}, device: "
        f"{jax.devices()[0].platform.upper()} x{jax.device_count()}, matmul backend: reference; "
        f"total {time.perf_counter() - t_start:.0f}s"
    )
    print("| model | runs as | eval loss | vs float | projection bytes | model bytes |")
    print("|---|---|---|---|---|---|")
    for name, how, loss, proj, total in results:
        pb = f"{proj:,} ({proj / f_proj:.2f}x)" if proj else "-"
        tb = f"{total:,}" if total else "-"
        print(f"| {name} | {how} | {loss:.4f} | {loss - f_loss:+.4f} | {pb} | {tb} |")
    by = {r[0]: r[2] for r in results}
    ptq4, qat4 = by["PTQ int4 (group 64)"], by[f"QAT int4 ({ft_steps} steps)"]
    ctrl = by[f"float +{ft_steps} steps (control)"]
    ptq4c = by[f"PTQ int4 of float +{ft_steps}"]
    print(
        f"\nClaim 'QAT int4 beats PTQ int4': vs PTQ int4 of the float model: {'HELD' if qat4 < ptq4 else 'DID NOT HOLD'} "
        f"({qat4:.4f} vs {ptq4:.4f}); at equal training steps (PTQ int4 of the float control): "
        f"{'HELD' if qat4 < ptq4c else 'DID NOT HOLD'} ({qat4:.4f} vs {ptq4c:.4f}, difference {ptq4c - qat4:+.4f}; "
        f"float control {ctrl:.4f}; differences of ~0.01 or less are within the noise of this short eval)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
