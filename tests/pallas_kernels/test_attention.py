"""Pallas FlashAttention: interpret-mode kernels vs a float64 reference (CPU), plus GPU checks.

Tolerances (max abs error vs the float64 reference on the same, already rounded, inputs ~N(0, 1);
observed values in brackets):
  * float32: forward 2e-5, dq/dk/dv 1e-4                    [~1e-6, ~5e-6]
  * bfloat16: forward 2e-2, dq/dk/dv 5e-2                   [8e-3, 1.5e-2]
  * float16: forward 3e-3, dq/dk/dv 1e-2                    [8e-4, 2e-3]
Low-precision error comes from rounding P (and dS) to the input dtype before the P@V / dS@K
matmuls, as every FlashAttention does, and from rounding the output / gradients.
The Triton kernels run with ``backend="interpret"``, the Mosaic TPU kernels with
``backend="tpu_interpret"``; both are also lowered (no GPU/TPU needed) to catch ops their
compilers can't take. Tests needing real hardware are marked ``gpu``.
"""

import contextlib
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import BlockSizes, attention_reference, decode_reference, flash_attention, flash_decode
from pallas_kernels.attention import api as attn_api
from pallas_kernels.attention.triton_fwd import block_range

BLOCKS = BlockSizes(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)
TOL = {  # dtype: (forward atol, gradient atol)
    "float32": (2e-5, 1e-4),
    "bfloat16": (2e-2, 5e-2),
    "float16": (3e-3, 1e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    q_len: int = 64
    kv_len: int = 64
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = False
    window: object = None
    segments: tuple | None = None  # packed segment lengths over kv_len; queries take the last
    batch: int = 2  # q_len positions of that packing
    scale: float | None = None


CASES = {
    "full_odd_len_77": Case(q_len=77, kv_len=77),
    "causal_130": Case(q_len=130, kv_len=130, causal=True),
    "causal_q_shorter_than_kv_77_130": Case(q_len=77, kv_len=130, causal=True),
    "noncausal_q_longer_than_kv_130_77": Case(q_len=130, kv_len=77),
    "window_5_3": Case(q_len=100, kv_len=100, window=(5, 3)),
    "window_1_custom_scale": Case(q_len=77, kv_len=77, window=1, scale=0.3),
    "window_ge_len_causal": Case(q_len=77, kv_len=77, causal=True, window=500),
    "causal_window_9_q_shorter": Case(q_len=50, kv_len=120, causal=True, window=9),
    "gqa_8_2_causal": Case(q_len=40, kv_len=40, heads=8, kv_heads=2, causal=True),
    "mqa_8_1_window": Case(q_len=40, kv_len=40, heads=8, kv_heads=1, window=(12, 0)),
    "packed_segments_causal": Case(q_len=96, kv_len=96, causal=True, segments=(10, 41, 1, 44)),
    "packed_segments_bidirectional_gqa": Case(q_len=70, kv_len=70, heads=4, kv_heads=2, segments=(33, 37)),
    "segments_causal_q_shorter_than_kv": Case(q_len=45, kv_len=90, causal=True, segments=(20, 30, 40)),
    "len_1": Case(q_len=1, kv_len=1, causal=True),
    "q_1_kv_77_causal": Case(q_len=1, kv_len=77, causal=True),
    "head_dim_128_causal": Case(q_len=48, kv_len=48, head_dim=128, causal=True, batch=1),
    "head_dim_40_padded": Case(q_len=33, kv_len=33, head_dim=40),
}


def _inputs(case: Case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((case.batch, case.q_len, case.heads, case.head_dim))
    k = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    v = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    do = rng.standard_normal((case.batch, case.q_len, case.heads, case.head_dim))
    kw = dict(causal=case.causal, local_window_size=case.window)
    if case.scale is not None:
        kw["scale"] = case.scale
    if case.segments is not None:
        assert sum(case.segments) == case.kv_len
        seg = np.repeat(np.arange(len(case.segments)), case.segments)[None]
        seg = np.repeat(seg, case.batch, 0).astype(np.int32)
        seg[-1] = seg[-1][::-1]  # second batch row: a different packing
        if case.q_len == case.kv_len:
            kw["q_segment_ids"] = jnp.asarray(seg)  # one array: used for q and kv
        else:
            kw["q_segment_ids"] = jnp.asarray(seg[:, -case.q_len :])
            kw["kv_segment_ids"] = jnp.asarray(seg)
    cast = lambda x: jnp.asarray(x, dtype)
    return tuple(map(cast, (q, k, v))), cast(do), kw, (q, k, v, do)


def _reference_f64(arrays64, kw):
    """Forward and (dq, dk, dv) of the reference in float64."""
    q, k, v, do = arrays64
    with jax.enable_x64(True):
        kw64 = {n: (jnp.asarray(np.asarray(x)) if n.endswith("segment_ids") else x) for n, x in kw.items()}
        seg = {n: x for n, x in kw64.items() if n.endswith("segment_ids")}
        static = {n: x for n, x in kw64.items() if n not in seg}

        @jax.jit
        def run(q, k, v, do, seg):
            out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **static, **seg), q, k, v)
            return out, vjp(do)

        out, grads = run(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, do)), seg)
        assert out.dtype == jnp.float64
        return np.asarray(out), [np.asarray(g) for g in grads]


def _flash_with_grads(inputs, do, kw, **extra):
    """Output and (dq, dk, dv) of flash_attention, jitted as one program (faster to interpret)."""
    seg = {n: x for n, x in kw.items() if n.endswith("segment_ids")}
    static = {n: x for n, x in kw.items() if n not in seg}

    @jax.jit
    def run(q, k, v, do, seg):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **static, **seg, **extra), q, k, v)
        return out, vjp(do)

    return run(*inputs, do, seg)


def _assert_close(name, got, want, atol):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert not np.isnan(got).any(), f"{name} has NaN"
    err = np.abs(got - want).max()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_float64_reference(case):
    inputs, do, kw, arrays64 = _inputs(case, jnp.float32)
    out, grads = _flash_with_grads(inputs, do, kw, block_sizes=BLOCKS, backend="interpret")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    assert out.shape == inputs[0].shape and out.dtype == jnp.float32
    fwd_tol, grad_tol = TOL["float32"]
    _assert_close("out", out, ref_out, fwd_tol)
    for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype
        _assert_close(name, g, rg, grad_tol)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_within_documented_tolerance(dtype):
    case = Case(q_len=77, kv_len=77, heads=4, kv_heads=2, causal=True)
    inputs, do, kw, _ = _inputs(case, getattr(jnp, dtype))
    # Reference on the same (rounded) inputs, in float64.
    arrays64 = tuple(np.asarray(x.astype(jnp.float32), np.float64) for x in (*inputs, do))
    out, grads = _flash_with_grads(inputs, do, kw, block_sizes=BLOCKS, backend="interpret")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    assert out.dtype == getattr(jnp, dtype)
    fwd_tol, grad_tol = TOL[dtype]
    _assert_close("out", out, ref_out, fwd_tol)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == getattr(jnp, dtype)
        _assert_close(name, g, rg, grad_tol)


@pytest.mark.parametrize("mode", ["segment_without_keys", "causal_q_longer_than_kv"])
def test_rows_without_visible_keys_are_zero_not_nan(mode):
    rng = np.random.default_rng(1)
    if mode == "segment_without_keys":
        t = s = 40
        q_seg = np.zeros((1, t), np.int32)
        q_seg[0, 20:] = 7  # segment 7 has no keys
        kw = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.zeros((1, s), jnp.int32))
        empty = np.s_[:, 20:]
    else:
        t, s = 50, 30  # first 20 queries sit before the first key
        kw = dict(causal=True)
        empty = np.s_[:, :20]
    q, k, v, do = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((1, t, 2, 64), (1, s, 2, 64), (1, s, 2, 64), (1, t, 2, 64)))
    out, (dq, dk, dv) = _flash_with_grads((q, k, v), do, kw, block_sizes=BLOCKS, backend="interpret")
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.isfinite(np.asarray(x)).all(), f"{name} not finite"
    assert np.all(np.asarray(out)[empty] == 0)
    assert np.all(np.asarray(dq)[empty] == 0)
    ref_out, ref_grads = _reference_f64(tuple(np.asarray(x, np.float64) for x in (q, k, v, do)), kw)
    _assert_close("out", out, ref_out, TOL["float32"][0])
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _assert_close(name, g, rg, TOL["float32"][1])


DECODE_CASES = {
    "q1_gqa_8_2_3_splits": dict(q_len=1, heads=8, kv_heads=2, window=None, splits=3),
    "q4_mqa_8_1": dict(q_len=4, heads=8, kv_heads=1, window=None, splits=2),
    "q3_mha_window_20": dict(q_len=3, heads=4, kv_heads=4, window=20, splits=None),
    "q16_window_7_0_cache_not_multiple_of_16": dict(q_len=16, heads=2, kv_heads=1, window=(7, 0), splits=4, cache=200),
}


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
@pytest.mark.parametrize("cfg", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_matches_float64_reference(cfg, backend):
    rng = np.random.default_rng(2)
    cache = cfg.get("cache", 256)
    b, t, h, kvh, d = 3, cfg["q_len"], cfg["heads"], cfg["kv_heads"], 64
    arrs = [rng.standard_normal(sh) for sh in ((b, t, h, d), (b, cache, kvh, d), (b, cache, kvh, d))]
    kv_len = np.array([cache, 100, 2], np.int32)  # last row: fewer keys than queries
    q, k, v = (jnp.asarray(x, jnp.float32) for x in arrs)
    out = flash_decode(q, k, v, kv_len=jnp.asarray(kv_len), num_splits=cfg["splits"], block_k=32, local_window_size=cfg["window"], backend=backend)
    with jax.enable_x64(True):
        ref = np.asarray(decode_reference(*(jnp.asarray(x, jnp.float64) for x in arrs), kv_len=jnp.asarray(kv_len), local_window_size=cfg["window"]))
    assert out.shape == q.shape
    _assert_close("decode", out, ref, TOL["float32"][0])


def test_decode_equals_flash_attention_on_last_queries():
    """flash_decode with a full cache is flash_attention(causal) restricted to the last tokens."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.bfloat16) for sh in ((2, 5, 4, 64), (2, 96, 2, 64), (2, 96, 2, 64)))
    dec = flash_decode(q, k, v, num_splits=2, block_k=32, backend="interpret")
    ref = attention_reference(q, k, v, causal=True)
    _assert_close("decode", dec, np.asarray(ref.astype(jnp.float32), np.float64), TOL["bfloat16"][0])


def test_reference_backend_and_auto_resolution():
    assert attn_api.resolve_backend("auto") == {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")
    inputs, _, kw, _ = _inputs(Case(q_len=20, kv_len=20, causal=True), jnp.float32)
    np.testing.assert_allclose(flash_attention(*inputs, **kw, backend="reference"), attention_reference(*inputs, **kw), rtol=0, atol=0)


def test_window_int_means_symmetric_like_jax_nn():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 24, 2, 16)), jnp.float32) for _ in range(3))
    ours = attention_reference(q, k, v, local_window_size=3)
    theirs = jax.nn.dot_product_attention(q, k, v, local_window_size=3, implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    ours = attention_reference(q, k, v, local_window_size=(4, 1))
    theirs = jax.nn.dot_product_attention(q, k, v, local_window_size=(4, 1), implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _visited_blocks(length, block, left, right):
    lo, _, _, hi = jax.vmap(
        lambda i: block_range(
            i * block, i * block + block - 1, reach_lo=left, reach_hi=right, block=block, n_blocks=length // block, n_full=length // block
        )
    )(jnp.arange(length // block))
    return int(jnp.sum(hi - lo))


def test_sliding_window_visits_linear_number_of_blocks():
    n = lambda length: _visited_blocks(length, 64, 128, 0)
    assert n(4096) == 64 * 3 - 3  # 3 blocks per query block (1, 2 at start)
    assert n(8192) == 2 * n(4096) + 3  # linear, not quadratic
    assert _visited_blocks(4096, 64, None, 0) == 64 * 65 // 2  # causal: triangle
    assert _visited_blocks(4096, 64, None, None) == 64 * 64


def test_packed_segment_ranges_skip_other_segments():
    seg = jnp.asarray(np.repeat(np.arange(4), 64)[None], jnp.int32)  # 4 segments of 64
    lo, hi = attn_api.segment_block_ranges(seg, seg, 32, 32)
    np.testing.assert_array_equal(lo[0], [0, 0, 2, 2, 4, 4, 6, 6])
    np.testing.assert_array_equal(hi[0], [2, 2, 4, 4, 6, 6, 8, 8])


BAD_INPUTS = {
    "q_rank_3": (dict(q=(2, 8, 16)), "q"),
    "kv_heads_not_dividing": (dict(k=(1, 8, 3, 16), v=(1, 8, 3, 16)), "k"),
    "v_shape_mismatch": (dict(v=(1, 8, 2, 32)), "v"),
    "segment_shape": (dict(q_segment_ids=(1, 7)), "q_segment_ids"),
    "negative_window": (dict(local_window_size=(-1, 2)), "local_window_size"),
    "block_not_power_of_two": (dict(block_sizes=(48, 32)), "block_sizes"),
    "unknown_backend": (dict(backend="cuda"), "backend"),
}


@pytest.mark.parametrize("bad,arg", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error_naming_argument(bad, arg):
    shapes = dict(q=(1, 8, 4, 16), k=(1, 8, 2, 16), v=(1, 8, 2, 16))
    kw = {}
    for name, val in bad.items():
        if name in shapes:
            shapes[name] = val
        elif name.endswith("segment_ids"):
            kw[name] = jnp.zeros(val, jnp.int32)
        else:
            kw[name] = val
    kw.setdefault("backend", "interpret")
    arrays = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        flash_attention(arrays["q"], arrays["k"], arrays["v"], **kw)


def test_decode_bad_q_len_raises():
    with pytest.raises(ValueError, match=r"^q: got shape \(1, 17, 2, 16\)"):
        flash_decode(jnp.zeros((1, 17, 2, 16)), jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 2, 16)))


@contextlib.contextmanager
def _pretend_h200():
    from jax._src.pallas.triton import gpu_info

    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    with mock.patch.object(gpu_info, "get_gpu_info", lambda: h200):
        yield


LOWERING_CASES = {
    "causal_bf16_d128": dict(causal=True),
    "segments_window_gqa": dict(window=(64, 16), segments=True),
    "odd_lengths_d64": dict(q_len=77, kv_len=130, head_dim=64),
}


@pytest.mark.parametrize("cfg", LOWERING_CASES.values(), ids=LOWERING_CASES.keys())
def test_gpu_kernels_lower_to_triton_ir(cfg):
    """Traces fwd+bwd for the Triton backend on CPU (no compile): catches ops Triton can't lower."""
    pytest.importorskip("jax._src.pallas.triton.gpu_info")
    t, s, d = cfg.get("q_len", 256), cfg.get("kv_len", 256), cfg.get("head_dim", 128)
    q = jax.ShapeDtypeStruct((2, t, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, s, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, t), jnp.int32) if cfg.get("segments") else None

    def f(q, k, v, seg):
        fn = lambda q, k, v: flash_attention(
            q, k, v, causal=cfg.get("causal", False), local_window_size=cfg.get("window"), q_segment_ids=seg, backend="gpu"
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    with _pretend_h200():
        text = jax.jit(f).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3  # fwd, dkdv, dq


def test_decode_kernel_lowers_to_mosaic():
    from jax import export

    q = jax.ShapeDtypeStruct((2, 4, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16)
    kv_len = jax.ShapeDtypeStruct((2,), jnp.int32)
    f = lambda q, k, v, n: flash_decode(q, k, v, kv_len=n, local_window_size=512, backend="tpu")
    exp = export.export(jax.jit(f), platforms=["tpu"])(q, kv, kv, kv_len)
    assert exp.mlir_module().count("tpu_custom_call") == 1


def test_decode_kernel_lowers_to_triton_ir():
    q = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16)
    kv_len = jax.ShapeDtypeStruct((2,), jnp.int32)
    f = lambda q, k, v, n: flash_decode(q, k, v, kv_len=n, backend="gpu")
    with _pretend_h200():
        text = jax.jit(f).trace(q, kv, kv, kv_len).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


TPU_CASES = {
    "gqa_causal_packed_segments": Case(q_len=40, kv_len=40, heads=4, kv_heads=2, causal=True, segments=(9, 31), batch=1),
    "window_q_shorter_than_kv": Case(q_len=30, kv_len=61, heads=2, kv_heads=1, window=(7, 2), batch=1),
    "mqa_8_1_odd_len": Case(q_len=37, kv_len=37, heads=8, kv_heads=1, batch=1),
}


@pytest.mark.parametrize(
    "name",
    [  # TPU interpret mode is slow: one case by default
        pytest.param(n, marks=() if i == 0 else pytest.mark.slow, id=n) for i, n in enumerate(TPU_CASES)
    ],
)
def test_tpu_kernels_in_tpu_interpret_mode_match_float64_reference(name):
    case = TPU_CASES[name]
    inputs, do, kw, arrays64 = _inputs(case, jnp.float32)
    blocks = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
    out, grads = _flash_with_grads(inputs, do, kw, block_sizes=blocks, backend="tpu_interpret")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    _assert_close("out", out, ref_out, TOL["float32"][0])
    for name_, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name_, g, rg, TOL["float32"][1])


@pytest.mark.parametrize("cfg", LOWERING_CASES.values(), ids=LOWERING_CASES.keys())
def test_tpu_kernels_lower_to_mosaic(cfg):
    """jax.export for "tpu" on CPU: lowers fwd + both bwd kernels to Mosaic (libtpu passes not run)."""
    from jax import export

    t, s, d = cfg.get("q_len", 256), cfg.get("kv_len", 256), cfg.get("head_dim", 128)
    q = jax.ShapeDtypeStruct((2, t, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, s, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, t), jnp.int32) if cfg.get("segments") else None

    def f(q, k, v, seg):
        fn = lambda q, k, v: flash_attention(
            q, k, v, causal=cfg.get("causal", False), local_window_size=cfg.get("window"), q_segment_ids=seg, backend="tpu"
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    exp = export.export(jax.jit(f), platforms=["tpu"])(q, kv, kv, seg)
    assert exp.mlir_module().count("tpu_custom_call") == 3


gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize(
    "case",
    [CASES["causal_130"], CASES["gqa_8_2_causal"], CASES["packed_segments_causal"], CASES["window_5_3"]],
    ids=["causal", "gqa", "segments", "window"],
)
def test_gpu_triton_kernels_match_reference(case):
    inputs, do, kw, arrays64 = _inputs(case, jnp.float32)
    out, grads = _flash_with_grads(inputs, do, kw, backend="gpu")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    # fp32 dots on GPU may use TF32-free IEEE math in Triton, but allow some slack.
    _assert_close("out", out, ref_out, 1e-3)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, rg, 5e-3)


@pytest.mark.gpu
@gpu_only
def test_gpu_bf16_large_and_decode():
    case = Case(q_len=1024, kv_len=1024, heads=8, kv_heads=2, head_dim=128, causal=True, batch=1)
    inputs, do, kw, _ = _inputs(case, jnp.bfloat16)
    arrays64 = tuple(np.asarray(x.astype(jnp.float32), np.float64) for x in (*inputs, do))
    out, grads = _flash_with_grads(inputs, do, kw, backend="gpu")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    # 1024 keys: sums 13x longer than the CPU tests, so allow 2x the CPU bf16 tolerance.
    _assert_close("out", out, ref_out, 2 * TOL["bfloat16"][0])
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, rg, 2 * TOL["bfloat16"][1])
    q = inputs[0][:, -1:]
    dec = flash_decode(q, inputs[1], inputs[2], backend="gpu")
    _assert_close("decode", dec, ref_out[:, -1:], 2 * TOL["bfloat16"][0])


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_larger_gqa_with_default_blocks(causal):
    case = Case(q_len=300, kv_len=300, heads=4, kv_heads=1, head_dim=128, causal=causal, batch=1)
    inputs, do, kw, arrays64 = _inputs(case, jnp.float32)
    out, grads = _flash_with_grads(inputs, do, kw, backend="interpret")
    ref_out, ref_grads = _reference_f64(arrays64, kw)
    _assert_close("out", out, ref_out, TOL["float32"][0])
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, rg, TOL["float32"][1])


@pytest.mark.slow
def test_benchmark_small_smoke_runs():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "experiments", "bench_attention.py"), "--small", "--skip", "window,gqa"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "decode" in proc.stdout
