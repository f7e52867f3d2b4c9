"""Quantized matmuls (pallas_kernels.quant): Pallas kernels in interpret mode (CPU) vs float64 numpy
dequantize-then-matmul, quantization error bounds, pytree behaviour, W8A8 error bounds.

Tolerances (max abs error, relative to the magnitude ``|x| @ |W|`` of the exact product):
  * float32 x: kernel vs float64 ``x @ dequantize(qw)``: 1e-5 * (|x| @ |W|) + 1e-6 (fp32 accumulation).
  * bfloat16 x: 2**-7 * (|x| @ |W|) + 1e-3 (weights rounded to bf16 in the kernel, bf16 output).
  * quantize/dequantize: the per-element bound each format implies (scale / 2 for int8/int4,
    half the largest NF4 codebook gap x absmax for nf4, + the double-quant constant error).
  * W8A8: the first-order int8 bound sum_k |x_k| sw_n / 2 + |w_k| sx_m / 2 + sx_m sw_n / 4, computed per element.
"""

import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant import NF4_CODEBOOK, QuantizedWeight, dequantize, int8_matmul, quantize, quantized_matmul
from pallas_kernels.quant import api as qapi
from pallas_kernels.quant import formats as qformats

K, N = 200, 72  # neither is a multiple of any block size
CONFIGS = {
    "int8_channel": ("int8", {}),
    "int8_channel_asym": ("int8", {"symmetric": False}),
    "int8_group32": ("int8", {"group_size": 32}),
    "int4_g64": ("int4", {}),
    "int4_g32_asym": ("int4", {"group_size": 32, "symmetric": False}),
    "nf4": ("nf4", {}),
    "nf4_dq": ("nf4", {"double_quant": True}),
}


def _rand(shape, seed, dtype=np.float32, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _weight(seed=0, k=K, n=N):
    # some heavier-tailed columns so scales differ a lot across groups/channels
    w = _rand((k, n), seed)
    w[:, ::7] *= 5.0
    return w


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check_close(out, x, w_deq, tol_rel, tol_abs):
    out = _f64(out)
    x64, w64 = _f64(x), np.asarray(w_deq, np.float64)
    ref = x64 @ w64
    mag = np.abs(x64) @ np.abs(w64)
    assert np.all(np.isfinite(out)), "non-finite output"
    err = np.abs(out - ref)
    bound = tol_rel * mag + tol_abs
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


def test_nf4_codebook_is_qlora_normalfloat():
    cb = np.asarray(NF4_CODEBOOK, np.float64)
    assert cb.shape == (16,) and np.all(np.diff(cb) > 0)
    assert cb[0] == -1.0 and cb[-1] == 1.0 and np.count_nonzero(cb == 0.0) == 1 and cb[7] == 0.0
    # QLoRA construction: 8 positive / 7 negative N(0,1) quantiles at offset 0.9677, normalized.
    nd, off = statistics.NormalDist(), 0.9677083
    pos = [nd.inv_cdf(p) for p in np.linspace(off, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(off, 0.5, 8)[:-1]]
    vals = np.sort(np.asarray(pos + [0.0] + neg))
    vals /= np.abs(vals).max()
    np.testing.assert_allclose(cb, vals, atol=2e-6)


def _elementwise_bound(qw, w):
    """Per-element |w - dequantize(qw)| bound implied by the format (numpy, [K, N])."""
    k = w.shape[-2]
    g = qw.group_size
    s = np.asarray(qformats.absmax_of(qw), np.float64)
    s_full = s if g is None else np.repeat(s, g, axis=-2)[..., :k, :]
    if qw.fmt == "nf4":
        gap = np.max(np.diff(np.asarray(NF4_CODEBOOK, np.float64)))
        bound = gap / 2 * np.abs(s_full)
        if qw.double_quant:  # absmax constant error (clipping when the dq absmax is below the true one)
            s2 = np.asarray(qw.dq_scales, np.float64)
            s2_full = np.repeat(np.repeat(s2, 256, axis=-1)[..., :N], g, axis=-2)[..., :k, :]
            bound = bound + s2_full / 2
        return bound
    return s_full / 2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_dequantize_error_bound(name):
    fmt, kw = CONFIGS[name]
    w = _weight(seed=1)
    qw = quantize(jnp.asarray(w), fmt, **kw)
    deq = np.asarray(dequantize(qw), np.float64)
    assert deq.shape == w.shape and np.all(np.isfinite(deq))
    err = np.abs(deq - w)
    bound = _elementwise_bound(qw, w) * (1 + 1e-5) + 1e-7
    assert np.all(err <= bound), f"{name}: max err/bound {(err / bound).max():.4f}"
    # the bound is not vacuous: errors use a good part of it
    assert (err / bound).max() > 0.3


def test_quantize_batched_weight_and_axis():
    w = _rand((2, 3, 96, 40), 2)
    qw = quantize(jnp.asarray(w), "int4", axis=-2, group_size=32, symmetric=False)
    assert qw.shape == w.shape and qw.data.shape == (2, 3, 48, 40) and qw.scales.shape == (2, 3, 3, 40)
    deq = np.asarray(dequantize(qw))
    for i in range(2):
        for j in range(3):
            one = np.asarray(dequantize(quantize(jnp.asarray(w[i, j]), "int4", group_size=32, symmetric=False)))
            np.testing.assert_array_equal(deq[i, j], one)
    qn = quantize(jnp.asarray(w), "nf4", axis=2, double_quant=True)
    assert np.abs(np.asarray(dequantize(qn)) - w).max() < 0.2 * np.abs(w).max()
    qa = quantize(jnp.asarray(w[0, 0]), "int8", axis=0)  # axis=0 is K for a 2-D weight
    assert qa.shape == (96, 40)
    with pytest.raises(ValueError, match="axis"):
        quantize(jnp.asarray(w[0, 0]), "int8", axis=1)


def test_bytes_per_param():
    w = jnp.asarray(_rand((1024, 512), 3))
    q = quantize(w, "nf4", double_quant=True)
    assert q.nbytes == sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(q))
    assert q.bytes_per_param <= 0.52, q.bytes_per_param
    assert quantize(w, "nf4").bytes_per_param == pytest.approx(0.5 + 4 / 64)
    assert quantize(w, "int4", group_size=128).bytes_per_param == pytest.approx(0.5 + 4 / 128)
    assert quantize(w, "int8").bytes_per_param == pytest.approx(1 + 4 / 1024)
    # int4 packing really is two codes per byte
    assert quantize(w, "int4").data.dtype == jnp.uint8 and quantize(w, "int4").data.shape == (512, 512)


def test_quantized_weight_is_a_pytree_through_jit_and_tree_map():
    qw = quantize(jnp.asarray(_weight(4)), "nf4", double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert all(isinstance(l, jax.Array) for l in leaves) and len(leaves) == 4  # data, scales, dq_scales, dq_mean
    doubled = jax.tree_util.tree_map(lambda a: a, qw)
    assert isinstance(doubled, QuantizedWeight) and doubled.fmt == "nf4" and doubled.shape == (K, N)

    @jax.jit
    def roundtrip(q):
        return q, dequantize(q)

    q2, deq = roundtrip(qw)
    assert isinstance(q2, QuantizedWeight) and jax.tree_util.tree_structure(q2) == treedef
    np.testing.assert_allclose(np.asarray(deq), np.asarray(dequantize(qw)), rtol=1e-6, atol=1e-6)
    x = jnp.asarray(_rand((5, K), 5))
    out = jax.jit(lambda x, q: quantized_matmul(x, q, backend="interpret"))(x, qw)
    _check_close(out, x, dequantize(qw), 1e-5, 1e-6)
    # float leaves can be cast with tree_map and stay usable
    qbf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, qw)
    assert qbf.dq_scales.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(dequantize(qbf))))


def test_quantized_weight_sharded():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs >= 2 devices")
    mesh = jax.sharding.Mesh(np.asarray(devices[:2]), ("x",))
    qw = quantize(jnp.asarray(_rand((256, 128), 6)), "int4", group_size=64)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    qs = jax.tree_util.tree_map(lambda a: jax.device_put(a, shard), qw)
    assert len(qs.data.sharding.device_set) == 2
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qs)), np.asarray(dequantize(qw)))


def test_quantized_weight_orbax_roundtrip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    qw = quantize(jnp.asarray(_weight(7)), "int4", group_size=32, symmetric=False)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "qw", qw)
    ckpt.wait_until_finished()
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), qw)
    restored = ckpt.restore(tmp_path / "qw", target)
    assert isinstance(restored, QuantizedWeight) and restored.fmt == "int4" and restored.shape == (K, N)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(qw)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# weight-only kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_matmul_f32(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(10)), fmt, **kw)
    w_deq = dequantize(qw)
    for m in (1, 5, 33):
        x = jnp.asarray(_rand((m, K), 100 + m))
        out = quantized_matmul(x, qw, backend="interpret")
        assert out.shape == (m, N) and out.dtype == jnp.float32
        _check_close(out, x, w_deq, 1e-5, 1e-6)


@pytest.mark.parametrize("name", ["int8_channel", "int4_g32_asym", "nf4_dq"])
def test_quantized_matmul_bf16_and_batch_dims(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(11)), fmt, **kw)
    x = jnp.asarray(_rand((2, 3, K), 12)).astype(jnp.bfloat16)
    out = quantized_matmul(x, qw, backend="interpret")
    assert out.shape == (2, 3, N) and out.dtype == jnp.bfloat16
    _check_close(out.reshape(6, N), x.reshape(6, K), dequantize(qw), 2**-7, 1e-3)
    ref = quantized_matmul(x, qw, backend="reference")
    assert ref.dtype == jnp.bfloat16 and ref.shape == out.shape


@pytest.mark.parametrize(
    "name,blocks",
    [
        ("int4_g32_asym", (16, 16, 64)),  # two groups per K step, several N blocks
        ("nf4_dq", {"block_m": 16, "block_n": 32, "block_k": 128}),
        ("int8_channel", (16, 64, 16)),  # many K steps, K padded 200 -> 208
        ("int8_group32", (32, 16, 32)),
        ("int4_g64", (16, 16, 64, 1)),  # no split-K
        ("nf4", {"block_n": 16, "split_k": 2}),
        ("int8_channel", (16, 16, 16, 13)),  # 13 K blocks: split_k must divide them -> error
    ],
)
def test_quantized_matmul_block_sizes(name, blocks):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(13)), fmt, **kw)
    x = jnp.asarray(_rand((33, K), 14))
    if isinstance(blocks, tuple) and len(blocks) == 4 and blocks[3] == 13:
        with pytest.raises(ValueError, match="split_k"):
            quantized_matmul(x, qw, backend="interpret", block_sizes=blocks)
        return
    out = quantized_matmul(x, qw, backend="interpret", block_sizes=blocks)
    _check_close(out, x, dequantize(qw), 1e-5, 1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_matmul_grad_wrt_x(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(20)), fmt, **kw)
    x = jnp.asarray(_rand((2, 5, K), 21))
    dy = _rand((2, 5, N), 22)

    def loss(x, q, backend):
        return jnp.sum(quantized_matmul(x, q, backend=backend) * dy)

    dx = jax.jit(jax.grad(loss), static_argnums=2)(x, qw, "interpret")
    assert dx.shape == x.shape and dx.dtype == x.dtype
    w64 = np.asarray(dequantize(qw), np.float64)
    ref = dy.astype(np.float64) @ w64.T
    mag = np.abs(dy.astype(np.float64)) @ np.abs(w64).T
    err = np.abs(np.asarray(dx, np.float64) - ref)
    assert np.all(np.isfinite(np.asarray(dx))) and np.all(err <= 1e-5 * mag + 1e-6), err.max()
    dx_ref = jax.grad(loss)(x, qw, "reference")
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-4, atol=1e-4)


def test_grad_cotangent_of_weight_is_zero_float0():
    qw = quantize(jnp.asarray(_weight(23)), "int4", group_size=32, symmetric=False)
    x = jnp.asarray(_rand((4, K), 24))
    out, vjp = jax.vjp(lambda x, q: quantized_matmul(x, q, backend="interpret"), x, qw)
    dx, dq = vjp(jnp.ones_like(out))
    assert isinstance(dq, QuantizedWeight)
    assert dq.data.dtype == jax.dtypes.float0 and dq.zeros.dtype == jax.dtypes.float0
    assert dq.scales.dtype == jnp.float32 and not np.any(np.asarray(dq.scales))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jnp.ones((4, N)) @ dequantize(qw).T), rtol=1e-4, atol=1e-4)
    # grad with allow_int through the weight also works
    g = jax.grad(lambda q: jnp.sum(quantized_matmul(x, q, backend="interpret")), allow_int=True)(qw)
    assert not np.any(np.asarray(g.scales))


def test_zero_weight_and_zero_rows_are_finite():
    w = _weight(25)
    w[:, :10] = 0.0  # all-zero columns -> zero scales
    w[:64, 20:30] = 0.0  # all-zero groups
    x = _rand((5, K), 26)
    x[2] = 0.0
    for fmt, kw in CONFIGS.values():
        qw = quantize(jnp.asarray(w), fmt, **kw)
        out = np.asarray(quantized_matmul(jnp.asarray(x), qw, backend="interpret"))
        assert np.all(np.isfinite(out)), (fmt, kw)
        assert np.all(out[2] == 0) and np.all(out[:, :10] == 0)
    out8 = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=6.0, backend="interpret"))
    assert np.all(np.isfinite(out8)) and np.all(out8[2] == 0)


def test_empty_batch():
    qw = quantize(jnp.asarray(_weight(26)), "int4")
    for backend in ("interpret", "reference"):
        assert quantized_matmul(jnp.zeros((0, K)), qw, backend=backend).shape == (0, N)
        assert int8_matmul(jnp.zeros((2, 0, K)), jnp.asarray(_weight(26)), backend=backend).shape == (2, 0, N)
    dx = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="interpret")))(jnp.zeros((0, K)))
    assert dx.shape == (0, K)


def test_backends_agree_and_auto():
    qw = quantize(jnp.asarray(_weight(27)), "nf4")
    x = jnp.asarray(_rand((7, K), 28))
    a = quantized_matmul(x, qw, backend="interpret")
    b = quantized_matmul(x, qw, backend="reference")
    c = quantized_matmul(x, qw)  # auto -> interpret on CPU
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert qapi._resolve_backend("auto") == {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")


def test_bad_inputs_raise_value_error():
    w = jnp.asarray(_weight(29))
    qw = quantize(w, "int4")
    bad = [
        (lambda: quantize(w, "int3"), "fmt"),
        (lambda: quantize(w[0], "int8"), "w: got shape"),
        (lambda: quantize(w.astype(jnp.int32), "int8"), "w: got dtype"),
        (lambda: quantize(w, "int4", group_size=48), "group_size"),
        (lambda: quantize(w, "int8", double_quant=True), "double_quant"),
        (lambda: quantize(w, "nf4", symmetric=False), "symmetric"),
        (lambda: quantized_matmul(jnp.ones((3, K + 1)), qw), r"x: got shape \(3, 201\)"),
        (lambda: quantized_matmul(jnp.ones((3, K), jnp.int32), qw), "x: got dtype"),
        (lambda: quantized_matmul(jnp.ones((3, K)), w), "qw"),
        (lambda: quantized_matmul(jnp.ones((3, K)), qw, backend="cuda"), "backend"),
        (lambda: quantized_matmul(jnp.ones((3, K)), qw, block_sizes=(16, 24, 64)), "block_n=24"),
        (lambda: quantized_matmul(jnp.ones((3, K)), qw, block_sizes=(16, 16, 32)), "block_k=32"),
        (lambda: int8_matmul(jnp.ones((3, K)), qw), "w: got QuantizedWeight"),
        (lambda: int8_matmul(jnp.ones((3, K)), w, outlier_threshold=-1.0), "outlier_threshold"),
        (lambda: int8_matmul(jnp.ones((3, K + 2)), w), "x: got shape"),
        (lambda: dequantize(w), "qw"),
    ]
    for fn, match in bad:
        with pytest.raises(ValueError, match=match):
            fn()


def test_triton_lowering_on_cpu():
    """Lower the GPU (Triton) kernels to Triton IR without a GPU (pretending to be an H200).

    This catches unsupported primitives / non power-of-two tensors in the Triton lowering; it does
    not compile PTX (that needs the GPU and runs in XLA)."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    from jax import export

    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    w = jnp.asarray(_rand((512, 512), 30))
    x = jnp.ones((3, 512), jnp.bfloat16)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    orig = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda *a, **k: h200
    try:
        for fmt, kw in CONFIGS.values():
            qw = quantize(w, fmt, **kw)

            def f(x, q):
                y, vjp = jax.vjp(lambda x: quantized_matmul(x, q, backend="gpu"), x)
                return y, vjp(y)[0]

            exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(x, qw)
            assert exp.mlir_module().count("__gpu$xla.gpu.triton") == 2
        exp = export.export(jax.jit(lambda x, w: int8_matmul(x, w, outlier_threshold=6.0, backend="gpu")), platforms=["cuda"], disabled_checks=checks)(
            x, w
        )
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()
    finally:
        gpu_info.get_gpu_info = orig


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tpu_kernels_interpret(name):
    """The Mosaic TPU kernels under pltpu.InterpretParams (CPU): forward (f32 and bf16) and grad wrt x."""
    fmt, kw = CONFIGS[name]
    k = 600  # > 8 groups / 512: several K blocks
    qw = quantize(jnp.asarray(_weight(31, k=k)), fmt, **kw)
    w_deq = dequantize(qw)
    x = jnp.asarray(_rand((2, 3, k), 32))
    out = quantized_matmul(x, qw, backend="tpu_interpret")
    assert out.shape == (2, 3, N)
    _check_close(out.reshape(6, N), x.reshape(6, k), w_deq, 1e-5, 1e-6)
    xb = x[0].astype(jnp.bfloat16)
    _check_close(quantized_matmul(xb, qw, backend="tpu_interpret"), xb, w_deq, 2**-7, 1e-3)
    dy = _rand((2, 3, N), 33)
    dx = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="tpu_interpret") * dy))(x)
    ref = dy.reshape(6, N).astype(np.float64) @ np.asarray(w_deq, np.float64).T
    mag = np.abs(dy.reshape(6, N).astype(np.float64)) @ np.abs(np.asarray(w_deq, np.float64)).T
    assert np.all(np.abs(np.asarray(dx, np.float64).reshape(6, k) - ref) <= 1e-5 * mag + 1e-6)


def test_tpu_int8_matmul_interpret():
    w = _weight(34, k=600, n=72)  # K > 512: several K blocks
    x = _rand((5, 600), 35)
    x[:, 9] *= 30
    for thr in (None, 6.0):
        got = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=thr, backend="tpu_interpret"))
        ref = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=thr, backend="reference"))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_tpu_lowering_on_cpu():
    """Lower the TPU kernels to Mosaic without a TPU (Mosaic's own layout passes run later, in libtpu)."""
    from jax import export

    w = jnp.asarray(_rand((1024, 512), 36))
    x = jnp.ones((16, 1024), jnp.bfloat16)
    for fmt, kw in CONFIGS.values():
        qw = quantize(w, fmt, **kw)

        def f(x, q):
            y, vjp = jax.vjp(lambda x: quantized_matmul(x, q, backend="tpu"), x)
            return y, vjp(y)[0]

        exp = export.export(jax.jit(f), platforms=["tpu"])(x, qw)
        assert exp.mlir_module().count("tpu_custom_call") == 2
    exp = export.export(jax.jit(lambda x, w: int8_matmul(x, w, outlier_threshold=6.0, backend="tpu")), platforms=["tpu"])(x, w)
    assert "tpu_custom_call" in exp.mlir_module()


# ------------------------------------------------------------------------------------------------
# W8A8
# ------------------------------------------------------------------------------------------------


def _w8a8_bound(x, w):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    sx = np.abs(x64).max(axis=1, keepdims=True) / 127
    sw = np.abs(w64).max(axis=0, keepdims=True) / 127
    k = x.shape[1]
    return np.abs(x64).sum(axis=1, keepdims=True) * sw / 2 + sx / 2 * np.abs(w64).sum(axis=0, keepdims=True) + k * sx * sw / 4


def test_int8_matmul_within_int8_error_bound():
    w = _weight(40)
    for m in (1, 33):
        x = _rand((m, K), 41 + m)
        out = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), backend="interpret"), np.float64)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        err = np.abs(out - ref)
        bound = _w8a8_bound(x, w) * (1 + 1e-4) + 1e-4
        assert np.all(np.isfinite(out)) and np.all(err <= bound), (err / bound).max()
        assert (err / bound).max() > 0.01  # it really is quantized
        # same quantization in the pure-jnp reference; a prepared int8 weight gives the same result
        np.testing.assert_allclose(out, np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), backend="reference")), rtol=1e-5, atol=1e-5)
        qw = quantize(jnp.asarray(w), "int8")
        np.testing.assert_allclose(out, np.asarray(int8_matmul(jnp.asarray(x), qw, backend="interpret")), rtol=1e-5, atol=1e-5)


def test_int8_matmul_batch_dims_bf16():
    w = jnp.asarray(_weight(42))
    x = jnp.asarray(_rand((2, 3, K), 43)).astype(jnp.bfloat16)
    x32 = np.asarray(x.astype(jnp.float32)).reshape(6, K)
    ref = x32.astype(np.float64) @ np.asarray(w, np.float64)
    for thr in (None, 6.0):  # no |x| >= 6 here: the outlier path must then change nothing
        out = int8_matmul(x, w, backend="interpret", outlier_threshold=thr, block_sizes={"block_m": 16, "block_n": 32, "block_k": 64})
        assert out.shape == (2, 3, N) and out.dtype == jnp.bfloat16
        err = np.abs(_f64(out).reshape(6, N) - ref)
        assert np.all(err <= _w8a8_bound(x32, np.asarray(w)) + 2**-8 * np.abs(ref) + 1e-3)
    x = x.at[0, 1, 7].set(50.0)  # one outlier column, bf16 x through both paths
    out = int8_matmul(x, w, backend="interpret", outlier_threshold=6.0)
    ref = np.asarray(x.astype(jnp.float32), np.float64).reshape(6, K) @ np.asarray(w, np.float64)
    assert np.all(np.isfinite(_f64(out))) and np.abs(_f64(out).reshape(6, N) - ref).max() < 0.1 * np.abs(ref).max()


def test_int8_outlier_decomposition_reduces_error():
    w = _weight(44) / 5
    x = _rand((33, K), 45)
    x[:, [3, 50, 151]] *= 40.0  # a few large-magnitude feature columns, as in LLM activations
    assert np.abs(x).max() > 6.0
    ref = x.astype(np.float64) @ w.astype(np.float64)
    plain = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), backend="interpret"), np.float64)
    dec = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=6.0, backend="interpret"), np.float64)
    dec_ref = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=True, backend="reference"), np.float64)
    e_plain, e_dec = np.abs(plain - ref).max(), np.abs(dec - ref).max()
    assert np.all(np.isfinite(dec)) and e_dec < 0.25 * e_plain, (e_plain, e_dec)
    np.testing.assert_allclose(dec, dec_ref, rtol=1e-5, atol=1e-4)
    # a cap below the number of outlier columns keeps the rest in int8: still correct, less accurate
    capped = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=6.0, max_outliers=1, backend="interpret"), np.float64)
    e_cap = np.abs(capped - ref).max()
    assert e_dec <= e_cap <= 1.5 * e_plain
    # jit-compatible (static shapes)
    jd = jax.jit(lambda x, w: int8_matmul(x, w, outlier_threshold=6.0, backend="interpret"))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(jd), dec, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# heavier / hardware tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_matmul_larger_interpret(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(50, k=1000, n=520)), fmt, **kw)
    x = jnp.asarray(_rand((70, 1000), 51))
    _check_close(quantized_matmul(x, qw, backend="interpret"), x, dequantize(qw), 1e-5, 1e-6)


@pytest.mark.slow
def test_bench_small_runs():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "experiments" / "bench_quant.py"), "--small"], capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "W8A8" in res.stdout and "nf4" in res.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_kernels_match_reference(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(60, k=1000, n=520)), fmt, **kw)
    w_deq = dequantize(qw)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)):
        for m in (1, 16, 70):
            x = jnp.asarray(_rand((m, 1000), 61 + m)).astype(dtype)
            out = quantized_matmul(x, qw, backend="gpu")
            assert out.dtype == dtype
            _check_close(out, x, w_deq, tol, 1e-3)
            dx = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="gpu").astype(jnp.float32)))(x)
            ref = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="reference").astype(jnp.float32)))(x)
            np.testing.assert_allclose(_f64(dx), _f64(ref), rtol=4 * tol, atol=4 * tol * 30)


@pytest.mark.gpu
def test_gpu_int8_matmul():
    w = _weight(62, k=1024, n=512)
    x = _rand((64, 1024), 63)
    x[:, 5] *= 30
    for thr in (None, 6.0):
        out = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=thr, backend="gpu"))
        ref = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(w), outlier_threshold=thr, backend="reference"))
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.tpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tpu_kernels_on_tpu(name):
    fmt, kw = CONFIGS[name]
    qw = quantize(jnp.asarray(_weight(64, k=1000, n=520)), fmt, **kw)
    w_deq = dequantize(qw)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)):
        x = jnp.asarray(_rand((33, 1000), 65)).astype(dtype)
        _check_close(quantized_matmul(x, qw, backend="tpu"), x, w_deq, tol, 1e-3)
        dx = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="tpu").astype(jnp.float32)))(x)
        ref = jax.grad(lambda x: jnp.sum(quantized_matmul(x, qw, backend="reference").astype(jnp.float32)))(x)
        np.testing.assert_allclose(_f64(dx), _f64(ref), rtol=4 * tol, atol=4 * tol * 30)
    x = _rand((64, 1000), 66)
    got = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(_weight(67, k=1000, n=520)), backend="tpu"))
    ref = np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(_weight(67, k=1000, n=520)), backend="reference"))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k_major", [False, True], ids=["w_kn", "w_nk_k_major"])
def test_w8a8_kernel_weight_layouts_match_int32_reference(k_major):
    """The W8A8 kernel with W as [K, N] or K-major W^T [N, K] (the layout 8-bit wgmma loads
    asynchronously) gives the exact int32 product times the scales; fresh random int8 inputs."""
    from pallas_kernels.quant import reference, triton_matmul

    rng = np.random.default_rng(123)
    xq = jnp.asarray(rng.integers(-127, 128, (64, 96)), jnp.int8)
    wq = jnp.asarray(rng.integers(-127, 128, (96, 48)), jnp.int8)
    sx = jnp.asarray(rng.uniform(0.01, 1.0, (64, 1)), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.01, 1.0, (1, 48)), jnp.float32)
    # float64 check of the int32 path: exact integer products, then the two scales
    want = (np.asarray(xq, np.float64) @ np.asarray(wq, np.float64)) * np.asarray(sx, np.float64) * np.asarray(sw, np.float64)
    xp = jnp.pad(xq, ((0, 0), (0, 32)))
    w_in = jnp.pad(wq.T, ((0, 16), (0, 32))) if k_major else jnp.pad(wq, ((0, 32), (0, 16)))
    got = triton_matmul.w8a8_matmul(
        xp, sx, w_in, jnp.pad(sw, ((0, 0), (0, 16))), bm=32, bn=32, bk=32, out_dtype=jnp.float32, interpret=True, k_major=k_major
    )[:, :48]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(reference.w8a8_core(xq, sx, wq, sw, jnp.float32)), want, rtol=1e-6, atol=1e-6)


def test_w8a8_prefill_uses_k_major_weight_and_matches_reference():
    """At M >= 128 int8_matmul passes W^T to the kernel (per-GPU table); result equals the reference."""
    from pallas_kernels.quant import reference, triton_matmul

    assert triton_matmul.w8a8_blocks(256, 64, 64, triton_matmul.MatmulBlocks())[1] is True
    assert triton_matmul.w8a8_blocks(16, 64, 64, triton_matmul.MatmulBlocks())[1] is False
    x = jnp.asarray(_rand((130, 64), 7))
    w = jnp.asarray(_rand((64, 48), 8))
    got = int8_matmul(x, w, outlier_threshold=2.5, backend="interpret")
    want = reference.int8_matmul(x, w, outlier_threshold=2.5)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
