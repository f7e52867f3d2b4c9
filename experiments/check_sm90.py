"""Deviceless compile check of every Pallas Triton kernel for an H100/H200 (sm_90a), no GPU needed.

For each kernel variant at the block sizes ``backend="auto"`` would pick on the target GPU:

1. lower the public function (forward and backward) with
   ``jax.jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=("cuda",))``, jax's GPU info
   patched to the target GPU (H100 for sm_90) as the kernel tests do;
2. take each ``stablehlo.custom_call @__gpu$xla.gpu.triton``: its ``mhlo.backend_config`` holds
   ``name, num_warps, num_stages, grid_*`` and ``ir`` (Triton MLIR bytecode); parse the bytecode in
   jax's Triton dialect context and print it as ``.ttir`` text;
3. in a side environment holding pip ``triton==3.6.*`` (the GPU machine's version; jax's own venv
   must not get it), run Triton's stages ttir -> ttgir -> llir -> PTX for
   ``GPUTarget("cuda", 90, 32)`` (a subprocess: ``--triton-worker``);
4. assemble the PTX with ``ptxas -arch=sm_90a -v`` (CUDA's, else the one Triton ships) and read
   registers, spill bytes; dynamic shared memory comes from Triton's metadata; count ``wgmma`` /
   ``mma.sync`` and asynchronous copies in the PTX; CTAs per SM from registers, shared memory and
   threads.
5. the Mosaic GPU kernels (``backend="mosaic_gpu"``; sm_90 only) compile inside XLA's CUDA plugin,
   which needs the GPU: for them the check reads the lowered module instead (launch grid, threads,
   dynamic shared memory, wgmma / TMA / setmaxnreg sites) and fails on > 227 KiB or no wgmma/TMA.

Prints a markdown table; exits 1 when a kernel fails to compile, spills, or needs more shared
memory than one CTA may have (227 KiB on sm_90), and 2 on bad arguments / a missing side environment.

    python experiments/check_sm90.py --make-env /tmp/sm90env     # once: venv with triton 3.6 (PyPI)
    python experiments/check_sm90.py                             # the check (~1 min on 2 CPU cores)
    python experiments/check_sm90.py --arch 80 --only attention  # A100 table entries, attention only
    python experiments/check_sm90.py --keep /tmp/sm90out         # keep .ttir/.ptx for reading

The side environment is looked up in ``--env``, ``$SM90_ENV``, then ``/tmp/sm90env``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRITON_SPEC = "triton==3.6.*"
DEFAULT_ENV = "/tmp/sm90env"

# Per-architecture limits of one SM (CUDA programming guide, "compute capabilities" table):
# registers per SM, shared memory per SM and the most one CTA may use (bytes), threads, CTAs.
ARCHS = {
    80: dict(gpu="A100", ptxas_arch="sm_80", regs=65536, smem_sm=164 * 1024, smem_cta=163 * 1024, threads=2048, ctas=32),
    90: dict(gpu="H100", ptxas_arch="sm_90a", regs=65536, smem_sm=228 * 1024, smem_cta=227 * 1024, threads=2048, ctas=32),
    100: dict(gpu="B200", ptxas_arch="sm_100a", regs=65536, smem_sm=228 * 1024, smem_cta=227 * 1024, threads=2048, ctas=32),
}
SMEM_RESERVED_PER_CTA = 1024  # the driver keeps 1 KiB of shared memory per resident CTA (sm_80+)


# ------------------------------------------------------------------------------------------------
# kernel variants (jax side)
# ------------------------------------------------------------------------------------------------


def kernel_cases(only: str | None = None):
    """[(case name, fn, args)]: each fn lowers to one or more Triton custom calls.

    Shapes are the issue's: causal bf16 attention at T=4096 with 32 query / 8 KV heads; matmuls
    with K = N = 4096 at M = 16 (decode) and M = 4096 (prefill); no block sizes given, so each
    kernel runs at the block sizes ``auto`` picks for the patched GPU.
    """
    import jax
    import jax.numpy as jnp

    from pallas_kernels import flash_attention, flash_decode, int8_matmul, quantize, quantized_matmul

    sds = jax.ShapeDtypeStruct
    cases = []

    def attn_case(d, **kw):
        def f(q, k, v, *seg):
            fn = lambda q, k, v: flash_attention(
                q,
                k,
                v,
                backend="gpu",  # noqa: E731
                q_segment_ids=seg[0] if seg else None,
                **kw,
            )
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(out)

        q = sds((1, 4096, 32, d), jnp.bfloat16)
        kv = sds((1, 4096, 8, d), jnp.bfloat16)
        args = (q, kv, kv) + ((sds((1, 4096), jnp.int32),) if kw.pop("_seg", False) else ())
        return f, args

    for d in (64, 128, 256):
        cases.append((f"attention causal d{d}", *attn_case(d, causal=True)))
    f, args = attn_case(128, local_window_size=(1024, 0), _seg=True)
    cases.append(("attention window+segments d128", f, args))
    for d in (64, 128):
        q = sds((8, 1, 32, d), jnp.bfloat16)
        kv = sds((8, 8192, 8, d), jnp.bfloat16)
        cases.append((f"decode d{d}", lambda q, k, v: flash_decode(q, k, v, backend="gpu"), (q, kv, kv)))

    w = sds((4096, 4096), jnp.float32)
    formats = {
        "int8": dict(fmt="int8"),
        "int8 asym": dict(fmt="int8", symmetric=False),
        "int8 g128": dict(fmt="int8", group_size=128),
        "int4 g64": dict(fmt="int4"),
        "int4 g128 asym": dict(fmt="int4", group_size=128, symmetric=False),
        "nf4": dict(fmt="nf4"),
        "nf4 dq": dict(fmt="nf4", double_quant=True),
    }
    for name, kw in formats.items():
        qw = jax.eval_shape(lambda w, kw=kw: quantize(w, **kw), w)
        for m in (16, 4096):

            def f(x, qw):
                y, vjp = jax.vjp(lambda x: quantized_matmul(x, qw, backend="gpu"), x)
                return y, vjp(y)[0]

            cases.append((f"{name} M={m}", f, (sds((m, 4096), jnp.bfloat16), qw)))
    for m in (16, 4096):
        f = lambda x, w: int8_matmul(x, w, backend="gpu")  # noqa: E731
        cases.append((f"w8a8 M={m}", f, (sds((m, 4096), jnp.bfloat16), qw_int8(w))))
    if only:
        cases = [c for c in cases if re.search(only, c[0])]
    return cases


def qw_int8(w_struct):
    import jax

    from pallas_kernels import quantize

    return jax.eval_shape(lambda w: quantize(w, "int8"), w_struct)


@contextlib.contextmanager
def pretend_gpu(arch: int):
    """jax's Pallas Triton lowering (and the kernels' block-size tables) see the target GPU."""
    from jax._src.pallas.triton import gpu_info

    version = getattr(gpu_info.GpuVersion, ARCHS[arch]["gpu"])
    info = gpu_info.get_gpu_info_from_version(version)
    orig = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda *a, **k: info
    try:
        yield info
    finally:
        gpu_info.get_gpu_info = orig


def triton_calls(fn, args, arch: int):
    """Lower ``fn(*args)`` for CUDA; returns [dict(name, num_warps, num_stages, grid, ttir)]."""
    import warnings

    import jax
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as tt_dialect

    with pretend_gpu(arch), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The Pallas Triton backend is deprecated"
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call" and "xla.gpu.triton" in ir.StringAttr(o.attributes["call_target_name"]).value:
                        calls.append(o)
                    walk(o.operation)

    walk(module.operation)
    ctx = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    out = []
    for o in calls:
        cfg = ir.DictAttr(o.attributes["mhlo.backend_config"])
        with ctx:
            kmod = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)
            ttir = kmod.operation.get_asm(enable_debug_info=False)
        out.append(
            dict(
                name=ir.StringAttr(cfg["name"]).value,
                num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                num_stages=ir.IntegerAttr(cfg["num_stages"]).value,
                grid=[ir.IntegerAttr(cfg[f"grid_{a}"]).value for a in "xyz"],
                ttir=ttir,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# Triton side (runs in the side environment's Python; imports triton only)
# ------------------------------------------------------------------------------------------------


def triton_worker(job_dir: str) -> int:
    """Compiles job_dir/jobs.json's .ttir files to PTX; writes job_dir/results.json."""
    import triton
    from triton.backends.compiler import GPUTarget

    jobs = json.loads(Path(job_dir, "jobs.json").read_text())
    results = []
    for job in jobs:
        target = GPUTarget("cuda", job["arch"], 32)
        t0 = time.perf_counter()
        try:
            k = triton.compile(job["ttir_path"], target=target, options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
            ptx_path = job["ttir_path"][: -len(".ttir")] + ".ptx"
            Path(ptx_path).write_text(k.asm["ptx"])
            results.append(dict(id=job["id"], ok=True, ptx_path=ptx_path, shared=int(k.metadata.shared), seconds=time.perf_counter() - t0))
        except Exception as e:  # reported per kernel, the check goes on
            msg = " ".join(str(e).split())[:300]
            results.append(dict(id=job["id"], ok=False, error=f"{type(e).__name__}: {msg}"))
    Path(job_dir, "results.json").write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------------------------------------------
# ptxas and the table
# ------------------------------------------------------------------------------------------------


def find_ptxas(env: Path, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for cand in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if cand and os.access(cand, os.X_OK):
            return cand
    bundled = sorted(env.glob("lib/python3*/site-packages/triton/backends/nvidia/bin/ptxas"))
    return str(bundled[0]) if bundled else None


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def run_ptxas(ptxas: str, ptx_path: str, arch: int) -> dict:
    cubin = ptx_path[:-4] + ".cubin"
    proc = subprocess.run([ptxas, f"-arch={ARCHS[arch]['ptxas_arch']}", "-v", ptx_path, "-o", cubin], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return dict(ok=False, error="ptxas: " + " ".join(text.split())[:300])
    regs = _PTXAS_RE["regs"].search(text)
    spill = _PTXAS_RE["spill"].search(text)
    stack = _PTXAS_RE["stack"].search(text)
    smem = _PTXAS_RE["static_smem"].search(text)
    return dict(
        ok=True,
        regs=int(regs.group(1)) if regs else 0,
        spill_st=int(spill.group(1)) if spill else 0,
        spill_ld=int(spill.group(2)) if spill else 0,
        stack=int(stack.group(1)) if stack else 0,
        static_smem=int(smem.group(1)) if smem else 0,
    )


def ptx_features(ptx: str) -> dict:
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    tcgen05 = len(re.findall(r"\btcgen05\.mma", ptx))
    mma = len(re.findall(r"\bmma\.sync", ptx))
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    cp_async = len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx))
    return dict(
        mma="tcgen05" if tcgen05 else "wgmma" if wgmma else "mma.sync" if mma else "-", copies="TMA" if tma else ("cp.async" if cp_async else "sync")
    )


def ctas_per_sm(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM from registers (256-register warp allocation unit), shared memory, threads."""
    lim = ARCHS[arch]
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_smem = lim["smem_sm"] // (smem + SMEM_RESERVED_PER_CTA) if smem else lim["ctas"]
    by_threads = lim["threads"] // threads
    return max(0, min(by_regs, by_smem, by_threads, lim["ctas"]))


def compile_cases(cases, arch: int, env_py: Path, ptxas: str, work: Path):
    """Lowers each (name, fn, args) case and compiles its Triton kernels; returns one row per kernel
    (None if the Triton worker itself failed)."""
    work.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    for case, fn, fargs in cases:
        for call in triton_calls(fn, fargs, arch):
            kid = len(jobs)
            ttir_path = work / f"k{kid:02d}_{call['name']}.ttir"
            ttir_path.write_text(call.pop("ttir"))
            jobs.append(dict(id=kid, arch=arch, ttir_path=str(ttir_path), num_warps=call["num_warps"], num_stages=call["num_stages"]))
            rows.append(dict(case=case, **call))
    Path(work, "jobs.json").write_text(json.dumps(jobs))
    wenv = dict(os.environ, TRITON_CACHE_DIR=str(work / "triton_cache"))
    wenv.pop("PYTHONPATH", None)
    proc = subprocess.run([str(env_py), str(Path(__file__).resolve()), "--triton-worker", str(work)], env=wenv, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"triton worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    results = {r["id"]: r for r in json.loads(Path(work, "results.json").read_text())}
    for kid, row in enumerate(rows):
        res = results[kid]
        row.update(ok=res["ok"], error=res.get("error"))
        if res["ok"]:
            pt = run_ptxas(ptxas, res["ptx_path"], arch)
            row.update(pt)
            if pt["ok"]:
                row["smem"] = res["shared"] + pt["static_smem"]
                row.update(ptx_features(Path(res["ptx_path"]).read_text()))
                row["ctas"] = ctas_per_sm(pt["regs"], row["smem"], row["num_warps"], arch)
    return rows


def check(args) -> int:
    env = Path(args.env or os.environ.get("SM90_ENV") or DEFAULT_ENV)
    env_py = env / "bin" / "python"
    if not env_py.exists():
        print(f"env: {env} has no bin/python; build it with: python {sys.argv[0]} --make-env {env}", file=sys.stderr)
        return 2
    ver = subprocess.run([str(env_py), "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    if ver.returncode != 0 or not ver.stdout.startswith("3.6"):
        print(f"env: {env} must hold {TRITON_SPEC} (found: {ver.stdout.strip() or 'no triton'}); rebuild it with --make-env {env}", file=sys.stderr)
        return 2
    ptxas = find_ptxas(env, args.ptxas)
    if ptxas is None:
        print("ptxas: not found on PATH, in /usr/local/cuda/bin or in the side environment's triton; give --ptxas PATH", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check_sm90_"))
    rows = compile_cases(kernel_cases(args.only), args.arch, env_py, ptxas, work)
    if rows is None:
        return 1
    lim = ARCHS[args.arch]
    failures = []
    for row in rows:
        label = f"{row['case']} / {row['name']}"
        if not row["ok"]:
            failures.append(f"{label}: does not compile ({row['error']})")
        else:
            if row["spill_st"] or row["spill_ld"]:
                failures.append(f"{label}: spills {row['spill_st']} / {row['spill_ld']} bytes")
            if row["smem"] > lim["smem_cta"]:
                failures.append(f"{label}: {row['smem']} bytes of shared memory > {lim['smem_cta']}")

    print(f"deviceless {lim['ptxas_arch']} ({lim['gpu']}), Triton 3.6 stages + {ptxas} ({len(rows)} kernels, {time.perf_counter() - t_start:.0f} s)\n")
    print("| case | kernel | grid | warps/stages | regs | spill st/ld B | smem KiB | mma | loads | CTAs/SM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        grid = "x".join(str(g) for g in r["grid"] if g > 1) or "1"
        if not r["ok"]:
            print(f"| {r['case']} | {r['name']} | {grid} | {r['num_warps']}/{r['num_stages']} | FAILED: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['case']} | {r['name']} | {grid} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | "
            f"{r['spill_st']}/{r['spill_ld']} | {r['smem'] / 1024:.1f} | {r['mma']} | {r['copies']} | "
            f"{r['ctas']} |"
        )
    mg_cases = mosaic_gpu_cases(args.only) if args.arch == 90 else []
    if mg_cases:
        print("\nMosaic GPU (lowered module; registers/spills need the GPU's compiler, not available here):\n")
        print("| case | grid | threads | dynamic smem KiB | wgmma sites | TMA sites | setmaxnreg |")
        print("|---|---|---|---|---|---|---|")
    for case, fn, fargs in mg_cases:
        r = mosaic_gpu_report(fn, fargs)
        if not r["ok"]:
            failures.append(f"{case}: {r['error']}")
            print(f"| {case} | FAILED: {r['error']} | | | | | |")
            continue
        print(f"| {case} | {'x'.join(map(str, r['grid']))} | {r['threads']} | {r['smem'] / 1024:.1f} | {r['wgmma']} | {r['tma']} | {r['setmaxnreg']} |")
        if r["smem"] > lim["smem_cta"]:
            failures.append(f"{case}: {r['smem']} bytes of shared memory > {lim['smem_cta']}")
        if not (r["wgmma"] and r["tma"]):
            failures.append(f"{case}: expected wgmma and TMA in the module (wgmma {r['wgmma']}, TMA {r['tma']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"\nFAIL ({len(failures)}):", *failures, sep="\n  ")
        return 1
    print(
        f"\nOK: {len(rows)} kernels compile for {lim['ptxas_arch']} with no spills and "
        f"<= {lim['smem_cta'] // 1024} KiB shared memory" + (f"; {len(mg_cases)} Mosaic GPU kernels lower with TMA + wgmma within it" if mg_cases else "")
    )
    return 0


# ------------------------------------------------------------------------------------------------
# Mosaic GPU kernels: lowered module only (they compile inside XLA's CUDA plugin, which needs a GPU)
# ------------------------------------------------------------------------------------------------


def mosaic_gpu_cases(only: str | None = None):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import flash_attention

    cases = []
    for d in (64, 128):
        q = jax.ShapeDtypeStruct((1, 4096, 32, d), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, 4096, 8, d), jnp.bfloat16)
        f = lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic_gpu")  # noqa: E731
        cases.append((f"mosaic_gpu attention fwd causal d{d}", f, (q, kv, kv)))
    return [c for c in cases if not only or re.search(only, c[0])]


def mosaic_gpu_report(fn, args) -> dict:
    """Launch shape, dynamic shared memory and instruction mix of the Mosaic GPU kernel in ``fn``,
    read from the MLIR module in its ``mosaic_gpu_v2`` custom call (LLVM/NVVM level, before ptxas)."""
    import jax
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call" and "mosaic_gpu" in ir.StringAttr(o.attributes["call_target_name"]).value:
                        calls.append(o)
                    walk(o.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    if len(calls) != 1:
        return dict(ok=False, error=f"expected 1 mosaic_gpu custom call, found {len(calls)}")
    ctx = jax_mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True
    with ctx:
        cfg = ir.DictAttr(calls[0].attributes["mhlo.backend_config"])
        text = str(ir.Module.parse(ir.StringAttr(cfg["module"]).value_bytes))
    consts = dict(re.findall(r'(%\w+) = "[\w.]*arith\.constant"\(\) \{value = (\d+) : (?:i32|index)\}', text))
    launch = re.search(r'"[\w.]*gpu\.launch"\(%\w+, ((?:%\w+, ){6}%\w+)\)', text)
    if not launch:
        return dict(ok=False, error="no gpu.launch in the Mosaic GPU module")
    vals = [int(consts.get(v, -1)) for v in launch.group(1).split(", ")]
    return dict(
        ok=True,
        grid=vals[0:3],
        threads=vals[3] * vals[4] * vals[5],
        smem=vals[6],
        wgmma=len(re.findall(r"wgmma\.mma_async", text)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", text)),
        setmaxnreg=len(re.findall(r"setmaxregister|setmaxnreg", text)),
    )


def make_env(path: str) -> int:
    env = Path(path)
    print(f"creating {env} with {TRITON_SPEC} (PyPI) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    proc = subprocess.run([str(env / "bin" / "pip"), "install", "-q", TRITON_SPEC])
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help=f"compute capability, one of {sorted(ARCHS)}")
    p.add_argument("--env", help=f"side environment with {TRITON_SPEC} (default $SM90_ENV or {DEFAULT_ENV})")
    p.add_argument("--make-env", metavar="DIR", help=f"create DIR as a venv with {TRITON_SPEC} and exit")
    p.add_argument("--ptxas", help="ptxas binary (default: PATH, /usr/local/cuda/bin, triton's own)")
    p.add_argument("--only", help="regex on the case names (e.g. 'attention|w8a8')")
    p.add_argument("--keep", metavar="DIR", help="write .ttir/.ptx/.cubin to DIR and keep them")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--triton-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.triton_worker:
        return triton_worker(args.triton_worker)
    if args.make_env:
        return make_env(args.make_env)
    if args.arch not in ARCHS:
        print(f"--arch: got {args.arch}, expected one of {sorted(ARCHS)}", file=sys.stderr)
        return 2
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
