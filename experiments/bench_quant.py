"""Benchmark the quantized-matmul kernels of ``pallas_kernels.quant``.

Checks correctness first (each kernel vs the pure-jnp reference; exits 1 on a mismatch or a NaN), then
prints:

  1. weight-only matmul, M in {1, 16, 64}, K = N = 8192: bf16 XLA matmul vs XLA
     dequantize-then-matmul vs our fused int8 / int4 / nf4 kernels: time (us), speed-up vs bf16 and
     effective weight bandwidth (bytes of the stored weight / time, GB/s);
  2. W8A8 (int8_matmul) at M = N = K = 8192 vs bf16: TFLOP/s and their ratio;
  3. bytes / parameter per format.

  python experiments/bench_quant.py              # on a GPU (backend auto -> gpu)
  python experiments/bench_quant.py --small      # tiny shapes, interpret mode on CPU (smoke test)
  python experiments/bench_quant.py --m 1 --block-n 32 --split-k 8 --num-warps 4 --num-stages 4   # tuning

GPU test run (tests/conftest.py forces CPU unless JAXEFF_TEST_DEVICE is set):
  JAXEFF_TEST_DEVICE=1 pytest tests/pallas_kernels/test_quant.py -m gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant import dequantize, int8_matmul, quantize, quantized_matmul

FORMATS = {"int8": dict(fmt="int8"), "int4": dict(fmt="int4", group_size=64), "nf4": dict(fmt="nf4", double_quant=True)}


def timeit(fn, *args, warmup: int, iters: int, reps: int = 3) -> float:
    """Median over ``reps`` of the mean wall time (us) of ``iters`` back-to-back calls."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(times)


def check_correctness(backend: str, small: bool, opts=None) -> bool:
    ok = True
    key = jax.random.key(0)
    k, n = (200, 72) if small else (4096, 1024)
    w = jax.random.normal(key, (k, n), jnp.float32)
    for m in (1, 33):
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32)
        for name, kw in FORMATS.items():
            qw = quantize(w, kw["fmt"], **{a: b for a, b in kw.items() if a != "fmt"})
            for dt in (jnp.float32, jnp.bfloat16):
                xd = x.astype(dt)
                got = np.asarray(quantized_matmul(xd, qw, backend=backend, block_sizes=opts).astype(jnp.float32), np.float64)
                ref = np.asarray(xd.astype(jnp.float32), np.float64) @ np.asarray(dequantize(qw), np.float64)
                mag = np.abs(np.asarray(xd.astype(jnp.float32), np.float64)) @ np.abs(np.asarray(dequantize(qw), np.float64))
                tol = (1e-5 if dt == jnp.float32 else 2**-7) * mag + 1e-3
                bad = (not np.all(np.isfinite(got))) or np.any(np.abs(got - ref) > tol)
                if bad:
                    print(f"MISMATCH {name} M={m} {jnp.dtype(dt).name}: max err {np.nanmax(np.abs(got - ref)):.3g}")
                    ok = False
        for thr in (None, 6.0):
            got = np.asarray(int8_matmul(x, w, outlier_threshold=thr, backend=backend))
            ref = np.asarray(int8_matmul(x, w, outlier_threshold=thr, backend="reference"))
            if not np.all(np.isfinite(got)) or not np.allclose(got, ref, rtol=1e-4, atol=1e-3):
                print(f"MISMATCH W8A8 M={m} threshold={thr}: max err {np.nanmax(np.abs(got - ref)):.3g}")
                ok = False
    print(f"correctness ({backend}): {'OK' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes in interpret mode on CPU (smoke test)")
    p.add_argument("--backend", default=None, help="kernel backend (default: auto; interpret with --small)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="M values of the weight-only table")
    p.add_argument("--k", type=int, default=None, help="K (default 8192, 256 with --small)")
    p.add_argument("--n", type=int, default=None, help="N (default 8192, 256 with --small)")
    p.add_argument("--w8a8-size", type=int, default=None, help="M = N = K of the W8A8 row (default 8192, 256 with --small)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--block-m", type=int, default=None, help="Triton kernels: block_m (default: by M)")
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--split-k", type=int, default=None, help="weight-only kernels: K splits (default: auto)")
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=None)
    args = p.parse_args(argv)

    backend = args.backend or ("interpret" if args.small else "auto")
    K = args.k or (256 if args.small else 8192)
    N = args.n or (256 if args.small else 8192)
    S = args.w8a8_size or (256 if args.small else 8192)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    iters = args.iters if args.iters is not None else (2 if args.small else 50)
    print(f"jax {jax.__version__}, devices {jax.devices()}, backend={backend}")
    if args.small:
        print("(--small: interpret-mode timings on CPU, meaningless as performance numbers)")

    opts = {
        "block_m": args.block_m,
        "block_n": args.block_n,
        "block_k": args.block_k,
        "split_k": args.split_k,
        "num_warps": args.num_warps,
        "num_stages": args.num_stages,
    }
    opts = {k: v for k, v in opts.items() if v is not None} or None
    w8_opts = None if opts is None else ({k: v for k, v in opts.items() if k != "split_k"} or None)
    if opts:
        print(f"block_sizes: {opts}")
    if not args.skip_check and not check_correctness(backend, args.small, opts):
        return 1

    key = jax.random.key(1)
    w = jax.random.normal(key, (K, N), jnp.float32) * 0.02
    w_bf16 = w.astype(jnp.bfloat16)
    qws = {name: quantize(w, kw["fmt"], **{a: b for a, b in kw.items() if a != "fmt"}) for name, kw in FORMATS.items()}

    bf16_mm = jax.jit(lambda x, w: x @ w)  # XLA accumulates bf16 dots in fp32 on GPU
    deq_mm = jax.jit(lambda x, q: x @ dequantize(q, jnp.bfloat16))
    fused = jax.jit(lambda x, q: quantized_matmul(x, q, backend=backend, block_sizes=opts))

    print(f"\nWeight-only matmul, K={K}, N={N} (x, out: bf16)")
    hdr = f"{'method':<26}{'M':>5}{'time (us)':>12}{'vs bf16':>10}{'weight GB/s':>14}"
    print(hdr)
    print("-" * len(hdr))
    for m in args.m:
        x = jax.random.normal(jax.random.fold_in(key, m), (m, K), jnp.float32).astype(jnp.bfloat16)
        t_bf16 = timeit(bf16_mm, x, w_bf16, warmup=warmup, iters=iters)
        rows = [("bf16 XLA matmul", t_bf16, 2 * K * N)]
        for name, qw in qws.items():
            rows.append((f"{name} XLA dequant+matmul", timeit(deq_mm, x, qw, warmup=warmup, iters=iters), qw.nbytes))
        for name, qw in qws.items():
            rows.append((f"{name} fused kernel", timeit(fused, x, qw, warmup=warmup, iters=iters), qw.nbytes))
        for label, t, nbytes in rows:
            print(f"{label:<26}{m:>5}{t:>12.1f}{t_bf16 / t:>9.2f}x{nbytes / (t * 1e-6) / 1e9:>14.1f}")
        print()

    print(f"W8A8 (LLM.int8()) at M=N=K={S}")
    xs = jax.random.normal(jax.random.fold_in(key, 7), (S, S), jnp.float32).astype(jnp.bfloat16)
    ws = jax.random.normal(jax.random.fold_in(key, 8), (S, S), jnp.float32) * 0.02
    ws_q = quantize(ws, "int8")
    ws_bf16 = ws.astype(jnp.bfloat16)
    flops = 2 * S**3
    t_bf16 = timeit(bf16_mm, xs, ws_bf16, warmup=warmup, iters=max(1, iters // 5))
    w8 = jax.jit(lambda x, q: int8_matmul(x, q, backend=backend, block_sizes=w8_opts))
    w8o = jax.jit(lambda x, q: int8_matmul(x, q, outlier_threshold=6.0, backend=backend, block_sizes=w8_opts))
    t_w8 = timeit(w8, xs, ws_q, warmup=warmup, iters=max(1, iters // 5))
    t_w8o = timeit(w8o, xs, ws_q, warmup=warmup, iters=max(1, iters // 5))
    hdr = f"{'method':<34}{'time (us)':>12}{'TFLOP/s':>10}{'vs bf16':>10}"
    print(hdr)
    print("-" * len(hdr))
    for label, t in (("bf16 XLA matmul", t_bf16), ("W8A8 int8 kernel (incl. x quant)", t_w8), ("W8A8 + outliers (threshold 6.0)", t_w8o)):
        print(f"{label:<34}{t:>12.1f}{flops / (t * 1e-6) / 1e12:>10.2f}{t_bf16 / t:>9.2f}x")

    print("\nBytes per parameter")
    for name, kw in [
        ("bf16", None),
        ("int8 per-channel", dict(fmt="int8")),
        ("int8 group 128", dict(fmt="int8", group_size=128)),
        ("int4 group 64 (sym)", dict(fmt="int4", group_size=64)),
        ("int4 group 128 (asym)", dict(fmt="int4", group_size=128, symmetric=False)),
        ("nf4", dict(fmt="nf4")),
        ("nf4 + double quant", dict(fmt="nf4", double_quant=True)),
    ]:
        if kw is None:
            bpp = 2.0
        else:
            bpp = quantize(w, kw["fmt"], **{a: b for a, b in kw.items() if a != "fmt"}).bytes_per_param
        print(f"{name:<26}{bpp:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
