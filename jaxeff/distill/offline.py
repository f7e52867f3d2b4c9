"""Offline distillation: the teacher's top-k logits for every training row, computed once to disk.

    jaxeff distill-topk configs/distill/student_kd.yaml --k 16 --out runs/teacher_top16.npz
    jaxeff train configs/distill/student_kd.yaml distill.offline_topk=runs/teacher_top16.npz

``precompute_topk`` runs the teacher (``distill.teacher_checkpoint``) over every packed training
row of the run's data and stores, per row, the top-k logits and their token ids at every position,
plus a fingerprint of the row's tokens. In training, the ``distill`` method looks each batch row up
by its fingerprint (inside the jitted step: the rows are independent of the loader's order, so
epochs and resumes need nothing else); a row that is not in the file gets no soft-target loss
(counted in the ``offline_miss`` metric).

The approximation: the teacher's distribution is truncated to its k most likely tokens and
renormalised, p̃_t = softmax(top-k logits / T), and the loss is T² · KL(p̃_t ‖ p_s) =
T² · Σ_{i in top-k} p̃_t,i (log p̃_t,i − log p_s,i) with the student's full softmax p_s. It equals
the online loss when the teacher's mass outside its top k is negligible; otherwise it
over-weights the head and ignores the tail (the student is not pushed to give the tail tokens
their small probabilities). Only the forward KL and no hidden-state loss are available offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import ConfigError

_MULT = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))


def row_fingerprints(inputs, segment_ids):
    """Two 32-bit polynomial hashes of each row's tokens and segments: ``[rows, seq] -> uint32[rows, 2]``
    (numpy or jax arrays alike; arithmetic wraps mod 2³²)."""
    xp = jnp if isinstance(inputs, jax.Array) else np
    x = inputs.astype(xp.uint32) * xp.uint32(1024) + segment_ids.astype(xp.uint32) + xp.uint32(1)
    seq = x.shape[-1]
    out = []
    for m in _MULT:
        powers = xp.cumprod(xp.full((seq,), m, xp.uint32)).astype(xp.uint32)
        out.append((x * powers).sum(-1, dtype=xp.uint32))
    return xp.stack(out, -1)


def topk_kd_loss(student_logits, topk_logits, topk_ids, mask=None, *, temperature: float = 1.0):
    """T² · KL(p̃_t ‖ p_s) over real tokens, p̃_t the teacher renormalised over its top k.

    student_logits ``[batch, seq, vocab]``; topk_logits / topk_ids ``[batch, seq, k]``.
    """
    from jaxeff.distill.losses import masked_mean

    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logp_s_k = jnp.take_along_axis(logp_s, topk_ids.astype(jnp.int32), axis=-1)
    logp_t = jax.nn.log_softmax(topk_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = (jnp.exp(logp_t) * (logp_t - logp_s_k)).sum(-1)
    return temperature**2 * masked_mean(kl, mask)


def lookup(table_fp, batch_inputs, batch_segments):
    """Index of each batch row in the table (``table_fp`` sorted by its first hash) and whether it
    was found (both hashes equal)."""
    fp = row_fingerprints(batch_inputs, batch_segments)
    idx = jnp.clip(jnp.searchsorted(table_fp[:, 0], fp[:, 0]), 0, table_fp.shape[0] - 1)
    found = jnp.all(table_fp[idx] == fp, axis=-1)
    return idx, found


def precompute_topk(cfg, k: int, out: str | Path, *, batch_rows: int = 64, progress: bool = False) -> Path:
    """Teacher top-k logits for every training row of ``cfg.data`` into ``out`` (.npz); ``progress``
    shows a bar over the rows on stderr."""
    from jaxeff.distill.teacher import load_teacher
    from jaxeff.models import Transformer
    from jaxeff.train.inputs import build_data

    d = cfg.distill
    teacher = load_teacher(d.teacher_checkpoint, d.teacher_step, cfg.model, cfg.data.seq_len, dtype=d.teacher_dtype)
    if not 0 < k <= teacher.config.vocab_size:
        raise ConfigError(f"k: expected 1..{teacher.config.vocab_size} (got {k})")
    model = Transformer(teacher.config)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(d.teacher_dtype)), teacher.params)
    _, loader, _ = build_data(cfg.data, cfg.model.vocab_size)
    rows = {key: np.concatenate([a[key] for a in loader._arrays]) for key in ("inputs", "positions", "segment_ids")}

    @jax.jit
    def top(params, inputs, positions, segment_ids):
        logits = model.apply({"params": params}, inputs, positions=positions, segment_ids=segment_ids).logits
        return jax.lax.top_k(logits, k)

    values, ids = [], []
    n_rows = rows["inputs"].shape[0]
    from tqdm import tqdm

    with tqdm(total=n_rows, desc=f"teacher top-{k}", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for i in range(0, n_rows, batch_rows):
            v, j = top(params, *(rows[key][i : i + batch_rows] for key in ("inputs", "positions", "segment_ids")))
            values.append(np.asarray(v, np.float32))
            ids.append(np.asarray(j, np.int32))
            bar.update(min(batch_rows, n_rows - i))
    fp = row_fingerprints(rows["inputs"], rows["segment_ids"])
    # identical rows carry identical targets: keep one; distinct rows sharing a first hash: drop both
    _, first = np.unique(fp, axis=0, return_index=True)
    fp, values, ids = fp[first], np.concatenate(values)[first], np.concatenate(ids)[first]
    order = np.argsort(fp[:, 0], kind="stable")
    fp, values, ids = fp[order], values[order], ids[order]
    h = fp[:, 0]
    clash = np.zeros(len(h), bool)
    clash[1:] |= h[1:] == h[:-1]
    clash[:-1] |= h[1:] == h[:-1]
    keep = ~clash
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        fingerprints=fp[keep],
        topk_logits=values[keep],
        topk_ids=ids[keep],
        k=np.int32(k),
        seq_len=np.int32(cfg.data.seq_len),
        vocab_size=np.int32(teacher.config.vocab_size),
    )
    return out


def load_topk(path: str | Path, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"distill.offline_topk: '{path}' does not exist (write it with jaxeff distill-topk)")
    with np.load(p) as f:
        table = {key: f[key] for key in ("fingerprints", "topk_logits", "topk_ids")}
        if int(f["seq_len"]) != seq_len or int(f["vocab_size"]) != vocab_size:
            raise ConfigError(
                f"distill.offline_topk: '{path}' was written for seq_len={int(f['seq_len'])}, "
                f"vocab_size={int(f['vocab_size'])}; this run has data.seq_len={seq_len}, "
                f"model.vocab_size={vocab_size}"
            )
    return table


def run(args) -> int:
    """``jaxeff distill-topk`` (arguments parsed by jaxeff.cli)."""
    from jaxeff.config import load_config

    cfg = load_config(args.config, args.overrides)
    path = precompute_topk(cfg, args.k, args.out, progress=args.progress and cfg.logging.progress)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """``jaxeff distill-topk ARGS`` as a function."""
    from jaxeff.cli import main as cli_main

    return cli_main(["distill-topk", *(argv or [])])


if __name__ == "__main__":  # the older spelling of `jaxeff distill-topk`
    raise SystemExit(main(sys.argv[1:]))
