"""backend="mosaic_gpu": the Hopper FlashAttention forward on Pallas Mosaic GPU (TMA, wgmma, a producer
warpgroup and two compute warpgroups), backward by the Triton kernels. On CPU it runs under Mosaic
GPU's interpreter ("mosaic_gpu_interpret") and is checked against a float64 reference, gradients too;
lowering for CUDA is checked without a GPU."""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, flash_decode
from pallas_kernels.attention import api as attn_api
from pallas_kernels.attention import attention_reference

TOL = {"bfloat16": (2e-2, 5e-2), "float16": (3e-3, 1e-2)}  # as tests/pallas_kernels/test_attention.py


def _inputs(b, t, s, h, kvh, d, dtype, seed):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, t, h, d)]
    arrs = [jnp.asarray(rng.standard_normal(sh), dtype) for sh in shapes]
    return arrs, [np.asarray(a.astype(jnp.float32), np.float64) for a in arrs]


def _reference64(arrays64, causal):
    with jax.enable_x64(True):
        q, k, v, do = (jnp.asarray(a) for a in arrays64)
        out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal), q, k, v)
        return np.asarray(out), [np.asarray(g) for g in vjp(do)]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(t=256, s=256, h=4, kvh=2, d=64, causal=True, dtype="float16"),  # GQA; warpgroup 0 releases slots
        dict(t=128, s=256, h=2, kvh=1, d=128, causal=False, dtype="bfloat16"),  # head_dim 128, q shorter than kv
    ],
    ids=["gqa_causal_d64_f16", "d128_bf16_kv_longer"],
)
def test_mosaic_gpu_forward_and_gradients_match_float64_reference_in_interpreter(cfg):
    dtype = getattr(jnp, cfg["dtype"])
    (q, k, v, do), arrays64 = _inputs(1, cfg["t"], cfg["s"], cfg["h"], cfg["kvh"], cfg["d"], dtype, seed=7)

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, causal=cfg["causal"], block_sizes=dict(block_k=64), backend="mosaic_gpu_interpret"), q, k, v
        )
        return out, vjp(do)

    out, grads = run(q, k, v, do)
    ref_out, ref_grads = _reference64(arrays64, cfg["causal"])
    fwd_tol, grad_tol = TOL[cfg["dtype"]]
    assert out.dtype == dtype
    for name, got, want, tol in [("out", out, ref_out, fwd_tol)] + [(n, g, r, grad_tol) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert not np.isnan(got).any(), f"{name} has NaN"
        err = np.abs(got - want).max()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@contextlib.contextmanager
def _pretend_h100():
    from jax._src.pallas.triton import gpu_info

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    with mock.patch.object(gpu_info, "get_gpu_info", lambda: h100):
        yield


def test_mosaic_gpu_forward_lowers_for_cuda_without_a_gpu():
    q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)

    def f(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic_gpu"), q, k, v)
        return out, vjp(out)

    with _pretend_h100():
        text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1  # the forward
    assert text.count("xla.gpu.triton") == 2  # dK/dV and dQ


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(local_window_size=64), r"^local_window_size: not supported by backend='mosaic_gpu'"),
        (dict(q_len=100), r"^q: got q_len 100, expected a multiple of 128"),
        (dict(head_dim=96), r"^q: got head_dim 96, expected 64 or 128"),
        (dict(dtype=jnp.float32), r"^q: got dtype float32, expected bfloat16 or float16"),
    ],
    ids=["window", "q_len", "head_dim", "dtype"],
)
def test_mosaic_gpu_refuses_what_it_cannot_run_naming_the_argument(kw, match):
    t, d, dtype = kw.pop("q_len", 128), kw.pop("head_dim", 64), kw.pop("dtype", jnp.bfloat16)
    q = jnp.zeros((1, t, 2, d), dtype)
    k = jnp.zeros((1, 128, 2, d), dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, backend="mosaic_gpu", **kw)


def test_mosaic_gpu_is_opt_in_and_has_no_decode_kernel():
    assert attn_api.resolve_backend("auto") != "mosaic_gpu"  # not timed on a GPU yet: never picked
    q = jnp.zeros((1, 1, 2, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^backend: got 'mosaic_gpu', which has no flash_decode kernel"):
        flash_decode(q, kv, kv, backend="mosaic_gpu")


def _on_hopper():
    if jax.default_backend() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    return str(cc).startswith("9")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an H100/H200 (sm_90)")
@pytest.mark.parametrize("d", [64, 128])
def test_mosaic_gpu_compiled_kernel_matches_float64_reference_on_hopper(d):
    (q, k, v, do), arrays64 = _inputs(2, 512, 512, 8, 2, d, jnp.bfloat16, seed=3)

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic_gpu"), q, k, v)
        return out, vjp(do)

    out, grads = run(q, k, v, do)
    ref_out, ref_grads = _reference64(arrays64, True)
    fwd_tol, grad_tol = TOL["bfloat16"]
    for name, got, want, tol in [("out", out, ref_out, fwd_tol)] + [(n, g, r, grad_tol) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert not np.isnan(got).any(), f"{name} has NaN"
        assert np.abs(got - want).max() <= tol, f"{name}: max abs error {np.abs(got - want).max():.3g} > {tol:.3g}"
