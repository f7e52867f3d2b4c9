"""The TTT-E2E architecture as pure functions over parameter trees.

The trained tree is ``{"model": <Transformer params>, "fast": {"layers_i": {...}}}``: the model's
own parameters (same names as :class:`jaxeff.models.Transformer`, so a checkpoint of the base
model loads into ``model``; with ``ttt.attention=none`` the blocks carry no ``attn``/``attn_norm``)
plus, for each fast block ``i``, an extra SwiGLU MLP with its own pre- and post-RMSNorm::

    h += Attn(AttnNorm(h))                      (skipped when ttt.attention = none)
    h += PostNorm'(FastMLP(PreNorm'(h)))        (fast blocks only)
    h += MLP(MlpNorm(h))

Blocks before the first fast block are the *prefix* (run once over the whole sequence); the rest
are the *suffix* (run chunk by chunk inside the inner loop, see :mod:`jaxeff.ttt.inner`). The
functions below re-implement the Transformer's block on plain dicts (the model module cannot take
an extra sublayer); ``tests/jaxeff/test_ttt.py`` pins them to ``Transformer.apply``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.errors import ConfigError
from jaxeff.models.attention import attention
from jaxeff.models.config import TransformerConfig
from jaxeff.models.transformer import rope_frequencies

FAST_KERNELS = ("gate", "up", "down")  # the inner ("fast") weights of a fast block
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class TTTSpec:
    """Everything static about a TTT-E2E model (hashable: a ``jit`` static argument)."""

    model: TransformerConfig
    mini_batch: int  # b, tokens per inner step
    fast_layers: tuple[int, ...]  # sorted block indices with a fast MLP
    fast_d_ff: int
    inner_lr: float
    inner_clip: float | None
    attention: str  # "window" | "none"
    remat: bool = True
    compute_dtype: str = "float32"  # prefix blocks (the model's dtype)
    inner_dtype: str = "float32"  # suffix blocks and the inner loop (float32; float64 in gradient checks)
    block_d_ff: int | None = None  # hidden width of the fast blocks' regular MLPs (None = model's d_ff)

    @property
    def first_fast(self) -> int:
        return self.fast_layers[0]

    @property
    def prefix_layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_fast))

    @property
    def suffix_layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_fast, self.model.n_layers))

    @property
    def use_attention(self) -> bool:
        return self.attention == "window"

    def window(self, layer: int) -> int:
        return self.model.windows[layer]

    @classmethod
    def from_config(cls, cfg, *, inner_dtype: str = "float32") -> "TTTSpec":
        """Validate the ``ttt`` section against the model and data; one-line ConfigError otherwise."""
        t, m = cfg.ttt, cfg.model
        n = m.n_layers
        if t.fast_layers is None:
            k = max(1, round(n * t.fast_fraction))
            fast = tuple(range(n - k, n))
        else:
            if not t.fast_layers:
                raise ConfigError("ttt.fast_layers: expected at least one block index (or null for the last quarter)")
            for i in t.fast_layers:
                if not 0 <= i < n:
                    raise ConfigError(f"ttt.fast_layers: block index {i} is out of range (model.n_layers={n}: 0..{n - 1})")
            if len(set(t.fast_layers)) != len(t.fast_layers):
                raise ConfigError(f"ttt.fast_layers: repeated block index in {list(t.fast_layers)}")
            fast = tuple(sorted(t.fast_layers))
        b = t.mini_batch
        if cfg.data.seq_len % b:
            raise ConfigError(f"ttt.mini_batch: {b} must divide data.seq_len={cfg.data.seq_len}")
        if t.attention == "window":
            for i in range(fast[0], n):
                w = m.windows[i]
                if w is None:
                    raise ConfigError(
                        f"model.sliding_window: ttt.attention=window needs a window in every block from "
                        f"the first fast block ({fast[0]}) on; block {i} has full attention"
                    )
                if b > w:
                    raise ConfigError(
                        f"ttt.mini_batch: {b} is larger than the sliding window of block {i} (model.sliding_window={w}); need mini_batch <= window"
                    )
        if m.dropout:
            raise ConfigError(f"model.dropout: ttt_e2e runs without dropout (got {m.dropout})")
        fast_d_ff, block_d_ff = t.fast_d_ff or m.ff, None
        if t.match_params:
            block_d_ff, fast_d_ff = matched_widths(m, t.fast_d_ff)
        return cls(
            model=m,
            mini_batch=b,
            fast_layers=fast,
            fast_d_ff=fast_d_ff,
            inner_lr=t.inner_lr,
            inner_clip=t.inner_clip,
            attention=t.attention,
            remat=t.remat,
            compute_dtype=m.dtype,
            inner_dtype=inner_dtype,
            block_d_ff=block_d_ff,
        )

    def extra_params(self) -> int:
        """Parameters of this TTT model minus those of the same model without TTT (same attention
        setting, no fast MLPs, full-width regular MLPs): the parameter-matching residual."""
        return len(self.fast_layers) * _fast_block_extra(self.model, self.block_d_ff or self.model.ff, self.fast_d_ff)


def _mlp_params(m: TransformerConfig, f: int) -> int:
    """Parameters of a block's regular SwiGLU MLP of hidden width ``f`` (biases with use_bias)."""
    return 3 * m.d_model * f + m.use_bias * (2 * f + m.d_model)


def _fast_block_extra(m: TransformerConfig, block_f: int, fast_f: int) -> int:
    """Extra parameters of one fast block: its regular MLP at ``block_f`` plus a fast MLP of width
    ``fast_f`` (three kernels, two norm scales), against a regular MLP at ``model.d_ff``."""
    return _mlp_params(m, block_f) + 3 * m.d_model * fast_f + 2 * m.d_model - _mlp_params(m, m.ff)


def matched_widths(m: TransformerConfig, fast_d_ff: int | None) -> tuple[int, int]:
    """``(regular MLP width of the fast blocks, fast MLP width)`` that make the TTT model's parameter
    count closest to the same model's without TTT: ``fast_d_ff`` fixed when given, else the two widths
    equal or the fast one a unit narrower. Ties go to the smaller model. One-line ConfigError when no
    width >= 1 fits."""
    if fast_d_ff:
        candidates = [(f, fast_d_ff) for f in range(1, m.ff + 1)]
    else:
        candidates = [(f, f - k) for f in range(1, m.ff + 1) for k in (0, 1) if f - k >= 1]
    extra = {c: _fast_block_extra(m, *c) for c in candidates}
    if min(extra.values()) > 0:  # even regular MLPs of width 1 leave the model larger
        raise ConfigError(
            f"ttt.match_params: cannot match the parameter count: fast MLPs of width "
            f"{fast_d_ff or 1} outweigh the regular MLPs of width {m.ff} they would replace "
            f"(lower ttt.fast_d_ff or set match_params: false)"
        )
    return min(candidates, key=lambda c: (abs(extra[c]), extra[c]))


# ---------------------------------------------------------------------------------------------- parameters


def add_fast_params(spec: TTTSpec, model_params, rng):
    """The model's parameters -> the TTT tree: fast MLPs (normal(0, init_std) kernels, unit norm
    scales) added; attention dropped when ``attention=none``."""
    m = spec.model
    dtype = _DTYPES[m.param_dtype]
    base = dict(model_params)
    if not spec.use_attention:
        base = {k: ({kk: vv for kk, vv in v.items() if kk not in ("attn", "attn_norm")} if k.startswith("layers_") else v) for k, v in base.items()}
    if spec.block_d_ff is not None:  # parameter-matched: the fast blocks' regular MLPs keep their first units
        base = {
            k: ({**v, "mlp": _narrow_mlp(v["mlp"], spec.block_d_ff)} if k in {f"layers_{i}" for i in spec.fast_layers} else v) for k, v in base.items()
        }
    fast = {}
    d, f = m.d_model, spec.fast_d_ff
    for j, i in enumerate(spec.fast_layers):
        kg, ku, kd = jax.random.split(jax.random.fold_in(rng, j), 3)
        normal = lambda key, shape: (m.init_std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        fast[f"layers_{i}"] = {
            "pre_norm": {"scale": jnp.ones((d,), dtype)},
            "post_norm": {"scale": jnp.ones((d,), dtype)},
            "gate": {"kernel": normal(kg, (d, f))},
            "up": {"kernel": normal(ku, (d, f))},
            "down": {"kernel": normal(kd, (f, d))},
        }
    return {"model": base, "fast": fast}


def _narrow_mlp(p, f: int):
    """A regular MLP's parameters cut to its first ``f`` hidden units (gate/up columns, down rows)."""
    out = {k: {**p[k], "kernel": p[k]["kernel"][:, :f]} for k in ("gate", "up")}
    for k in ("gate", "up"):
        if "bias" in p[k]:
            out[k]["bias"] = p[k]["bias"][:f]
    return {**out, "down": {**p["down"], "kernel": p["down"]["kernel"][:f]}}


def fast_logical_axes(spec: TTTSpec, model_axes):
    base = dict(model_axes)
    if not spec.use_attention:
        base = {k: ({kk: vv for kk, vv in v.items() if kk not in ("attn", "attn_norm")} if k.startswith("layers_") else v) for k, v in base.items()}
    fast = {
        f"layers_{i}": {
            "pre_norm": {"scale": P("norm")},
            "post_norm": {"scale": P("norm")},
            "gate": {"kernel": P("embed", "mlp")},
            "up": {"kernel": P("embed", "mlp")},
            "down": {"kernel": P("mlp", "embed")},
        }
        for i in spec.fast_layers
    }
    return {"model": base, "fast": fast}


def has_fast_weights(params) -> bool:
    """True when ``params`` is a TTT-E2E tree carrying fast MLPs (``{"model": ..., "fast": {non-empty}}``):
    a tree that no plain Transformer consumer (Hugging Face export, task-vector merges) can hold whole."""
    return isinstance(params, Mapping) and "model" in params and bool(params.get("fast"))


def refuse_fast_weights(params, where: str = "method") -> None:
    """Raise a one-line :class:`ConfigError` naming ``where`` if ``params`` has fast MLPs (see
    :func:`has_fast_weights`): taking ``params["model"]`` alone would silently drop them."""
    if has_fast_weights(params):
        layers = ", ".join(k.removeprefix("layers_") for k in params["fast"])
        raise ConfigError(
            f"{where}: a ttt_e2e run has fast MLPs (blocks {layers}) that a plain Transformer has no "
            f"place for; refusing to drop them (evaluate or generate with the run itself)"
        )


def initial_fast_weights(spec: TTTSpec, params, batch: int):
    """The inner weights at the start of a sequence, one copy per row:
    ``{"layers_i": {"gate": [batch, d, f], "up": [batch, d, f], "down": [batch, f, d]}}`` (inner dtype)."""
    dt = _DTYPES[spec.inner_dtype]
    out = {}
    for i in spec.fast_layers:
        p = params["fast"][f"layers_{i}"]
        out[f"layers_{i}"] = {k: jnp.broadcast_to(p[k]["kernel"].astype(dt), (batch, *p[k]["kernel"].shape)) for k in FAST_KERNELS}
    return out


# ------------------------------------------------------------------------------------------------- layers


def rms_norm(p, x, eps, dtype):
    xf = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * p["scale"].astype(y.dtype)).astype(dtype)


def dense(p, x, dtype):
    y = x.astype(dtype) @ p["kernel"].astype(dtype)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def mlp(p, x, dtype):
    """The block's SwiGLU MLP (shared weights): ``down(silu(gate(x)) * up(x))``."""
    return dense(p["down"], jax.nn.silu(dense(p["gate"], x, dtype)) * dense(p["up"], x, dtype), dtype)


def fast_mlp(w, x, dtype):
    """The fast SwiGLU MLP with per-row weights ``w`` (``gate/up [batch, d, f]``, ``down [batch, f, d]``)
    on ``x [batch, seq, d]``."""
    x = x.astype(dtype)
    g = jnp.einsum("btd,bdf->btf", x, w["gate"].astype(dtype))
    u = jnp.einsum("btd,bdf->btf", x, w["up"].astype(dtype))
    return jnp.einsum("btf,bfd->btd", jax.nn.silu(g) * u, w["down"].astype(dtype))


def rope(x, positions, theta, scaling=None):
    """Rotary embedding as :func:`jaxeff.models.transformer.rope`, computed in float32 or in the
    input's dtype when wider (float64 gradient checks)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    freq = rope_frequencies(x.shape[-1], theta, scaling).astype(dt)
    angles = positions.astype(dt)[..., None] * freq
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(dt), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def buffer_attention(q, keys, vals, q_start, window, q_seg, kv_seg):
    """Causal sliding-window attention of ``q [batch, c, heads, hd]`` (query i at key index
    ``q_start + i``) on ``keys, vals [batch, s, kv_heads, hd]``; a key is visible when it is not
    after the query, less than ``window`` indices before it, and in the same segment. Softmax in
    float32 (or the inputs' dtype when wider). Small by design: c <= b queries, s <= window + b keys."""
    b, c, h, d = q.shape
    s, kvh = keys.shape[1], keys.shape[2]
    dt = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, c, kvh, h // kvh, d).astype(dt)
    logits = jnp.einsum("bckgd,bskd->bkgcs", qg, keys.astype(dt)) * d**-0.5
    qi = q_start + jnp.arange(c)[:, None]
    ki = jnp.arange(s)[None, :]
    mask = ((ki <= qi) & (ki > qi - window))[None] & (q_seg[:, :, None] == kv_seg[:, None, :])  # [batch, c, s]
    mask = mask[:, None, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)
    out = jnp.einsum("bkgcs,bskd->bckgd", probs, vals.astype(dt))
    return out.reshape(b, c, h, d).astype(q.dtype)


def qkv(cfg: TransformerConfig, p, x, positions, dtype):
    """Roped ``q [batch, seq, heads, hd]`` and ``k, v [batch, seq, kv_heads, hd]``."""
    b, t, _ = x.shape
    q = dense(p["q"], x, dtype).reshape(b, t, cfg.n_heads, cfg.hd)
    k = dense(p["k"], x, dtype).reshape(b, t, cfg.kv_heads, cfg.hd)
    v = dense(p["v"], x, dtype).reshape(b, t, cfg.kv_heads, cfg.hd)
    return rope(q, positions, cfg.rope_theta, cfg.rope_scaling), rope(k, positions, cfg.rope_theta, cfg.rope_scaling), v


def block_rest(spec: TTTSpec, p, fast_p, w, x, dtype, w_fresh=None, fresh=None):
    """The sublayers after attention: the fast MLP (if ``fast_p``) and the block's MLP. With ``fresh
    [batch, c]`` (bool) the tokens where it is true go through the fast MLP with ``w_fresh`` instead
    of ``w`` (a document that started in this mini-batch: see :func:`jaxeff.ttt.inner.inner_step`)."""
    eps = spec.model.norm_eps
    if fast_p is not None:
        h = rms_norm(fast_p["pre_norm"], x, eps, dtype)
        y = fast_mlp(w, h, dtype)
        if fresh is not None:
            y = jnp.where(fresh[..., None], fast_mlp(w_fresh, h, dtype), y)
        x = x + rms_norm(fast_p["post_norm"], y, eps, dtype)
    return x + mlp(p["mlp"], rms_norm(p["mlp_norm"], x, eps, dtype), dtype)


def prefix_block(spec: TTTSpec, i: int, p, x, positions, segment_ids):
    """Block ``i`` (no fast MLP) over the whole sequence ``x [batch, seq, d]``; returns ``(x, k, v)``
    (the block's keys/values for a generation cache; None without attention)."""
    cfg, dtype = spec.model, _DTYPES[spec.compute_dtype]
    k = v = None
    if spec.use_attention:
        q, k, v = qkv(cfg, p["attn"], rms_norm(p["attn_norm"], x, cfg.norm_eps, dtype), positions, dtype)
        y = attention(q, k, v, impl=cfg.attention_impl, causal=True, window=spec.window(i), q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        x = x + dense(p["attn"]["o"], y.reshape(*x.shape[:2], -1), dtype)
    return block_rest(spec, p, None, None, x, dtype), k, v


def chunk_attention(spec: TTTSpec, i: int, p, x, positions, segment_ids, buf):
    """Attention of a suffix block on one chunk ``x [batch, c, d]`` (c <= b tokens) against the KV
    buffer of the previous ``window`` tokens ``buf = {"k", "v": [batch, K, kv_heads, hd], "seg":
    [batch, K]}`` (``seg == -1``: empty slot). Returns the attention output and the keys/values/segments
    of buffer + chunk (``[batch, K + c, ...]``)."""
    cfg, dtype = spec.model, _DTYPES[spec.inner_dtype]
    q, k, v = qkv(cfg, p["attn"], rms_norm(p["attn_norm"], x, cfg.norm_eps, dtype), positions, dtype)
    keys = jnp.concatenate([buf["k"].astype(dtype), k], axis=1)
    vals = jnp.concatenate([buf["v"].astype(dtype), v], axis=1)
    segs = jnp.concatenate([buf["seg"], segment_ids.astype(buf["seg"].dtype)], axis=1)
    y = buffer_attention(q, keys, vals, buf["k"].shape[1], spec.window(i), segment_ids, segs)
    return dense(p["attn"]["o"], y.reshape(*x.shape[:2], -1), dtype), {"k": keys, "v": vals, "seg": segs}


def empty_buffers(spec: TTTSpec, batch: int):
    """Empty KV buffers of the suffix blocks: per block ``window`` slots (``()`` without attention)."""
    if not spec.use_attention:
        return ()
    cfg, dt = spec.model, _DTYPES[spec.inner_dtype]
    out = []
    for i in spec.suffix_layers:
        w = spec.window(i)
        shape = (batch, w, cfg.kv_heads, cfg.hd)
        out.append({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "seg": jnp.full((batch, w), -1, jnp.int32)})
    return tuple(out)


def suffix_forward(spec: TTTSpec, params, w, bufs, x, positions, segment_ids, w_fresh=None, fresh=None):
    """The suffix blocks and the output head on one chunk ``x [batch, c, d]`` with fast weights
    ``w`` (``w_fresh`` where ``fresh [batch, c]`` is true, when given). Returns float32 ``logits
    [batch, c, vocab]`` and the grown buffers (buffer + chunk)."""
    dtype = _DTYPES[spec.inner_dtype]
    x = x.astype(dtype)
    grown = []
    for j, i in enumerate(spec.suffix_layers):
        p = params["model"][f"layers_{i}"]
        if spec.use_attention:
            y, g = chunk_attention(spec, i, p, x, positions, segment_ids, bufs[j])
            x = x + y
            grown.append(g)
        key = f"layers_{i}"
        x = block_rest(spec, p, params["fast"].get(key), w.get(key), x, dtype, None if w_fresh is None else w_fresh.get(key), fresh)
    return head(spec, params, x, dtype), tuple(grown)


def head(spec: TTTSpec, params, x, dtype):
    """Final norm and output projection (tied embeddings or ``lm_head``): float32 logits (float64
    when computing in float64)."""
    cfg, mp = spec.model, params["model"]
    x = rms_norm(mp["final_norm"], x, cfg.norm_eps, dtype)
    if cfg.tie_embeddings:
        logits = x @ mp["embed"]["embedding"].astype(dtype).T
    else:
        logits = dense(mp["lm_head"], x, dtype)
    return logits if logits.dtype == jnp.float64 else logits.astype(jnp.float32)


def embed(spec: TTTSpec, params, tokens):
    return params["model"]["embed"]["embedding"].astype(_DTYPES[spec.compute_dtype])[tokens]


def prefix_forward(spec: TTTSpec, params, tokens, positions, segment_ids):
    """Embedding and prefix blocks over the whole sequence: ``x [batch, seq, d]`` and per prefix block
    ``(k, v)`` (for a generation cache)."""
    x = embed(spec, params, tokens)
    kvs = []
    for i in spec.prefix_layers:
        fn = lambda p, x, i=i: prefix_block(spec, i, p, x, positions, segment_ids)
        if spec.model.remat:
            fn = jax.checkpoint(fn)
        x, k, v = fn(params["model"][f"layers_{i}"], x)
        kvs.append((k, v))
    return x, tuple(kvs)
