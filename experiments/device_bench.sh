#!/usr/bin/env bash
# One command for a lent GPU machine (issue 20): install what it lacks from carried wheels, check the
# kernels' correctness, run every benchmark, and write ONE markdown report, in under 9 minutes.
#
#   experiments/device_bench.sh [OUT_DIR]               # on the GPU machine (repo root); OUT_DIR default $OUT or runs/
#   experiments/device_bench.sh --dry-run [OUT_DIR]     # here, on CPU: same steps, tiny shapes, interpret mode
#   experiments/device_bench.sh --fetch-wheels          # here, with PyPI: download the wheels the GPU machine lacks
#                                                       # into .whl/ (carry it: run(carry=[".whl"]))
#
# Steps and their time limits (seconds; 500 s together, under 9 minutes with ~40 s for start-up):
#   env       30   nvidia-smi, jax devices, versions; carried wheels installed to /tmp/site
#   check     90   pytest tests/pallas_kernels -m gpu (kernels vs float64 references, gradients too)
#   attention 180  bench_attention.py: fwd, fwd+bwd vs cuDNN / tokamax / XLA; decode GB/s
#   quant     120  bench_quant.py: weight-only GEMV/GEMM vs bf16, W8A8 vs bf16, at M = 1, 16, 64, 4096
#   train     80   bench_train.py --model 125m --dtype bfloat16: tokens/s and MFU
# A step that fails or times out is recorded as such in the report and the next one runs.
# The GPU machine has no network: the wheels must travel in .whl/ (see /work/.library/device/README.md).
set -uo pipefail

DRY=0
FETCH=0
OUT_DIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "argument: unknown option $a (expected --dry-run, --fetch-wheels or an output folder)" >&2; exit 2 ;;
    *) OUT_DIR="$a" ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# Packages jaxeff needs that the GPU machine's image lacks (its list: KINDS.md), plus tokamax for the
# attention comparison with its own requirements the image lacks (tokamax 0.0.17's Requires-Dist, read
# here; xprof left out: a profiler, large). Newest cp312 wheels; not yet tried on the machine: the env
# step prints which imports work.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection tensorboardX tokamax einshape qwix immutabledict)

if [ "$FETCH" = 1 ]; then
  source scripts/find-python.sh || exit 2
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$w" || echo "fetch: $w not downloaded (the report will say n/a where it is needed)" >&2
  done
  ls -la .whl
  exit 0
fi

if [ "$DRY" = 1 ]; then
  PYBIN="${PYBIN:-$ROOT/.venv/bin/python}"
  SMALL="--small"
  LIMIT_SCALE=3   # interpret mode on a shared CPU: the limits guard against hangs, not the GPU budget
else
  LIMIT_SCALE=1
  PYBIN="${PYBIN:-python3}"   # the image's Python, which has jax 0.11.2 with CUDA 13
  SMALL=""
fi
OUT_DIR="${OUT_DIR:-${OUT:-runs/device_bench}}"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/device_bench.md"
LOGS="$OUT_DIR/device_bench_logs.txt"
: > "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)

if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYBIN" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

declare -a SUMMARY
# run_step NAME LIMIT_S CMD...: runs with a time limit, appends its output to the report and logs.
run_step() {
  local name="$1" limit="$(( $2 * LIMIT_SCALE ))"; shift 2
  local t=$(date +%s) rc out cmd="$*"
  cmd="${cmd//$'\n'/ }"; [ "${#cmd}" -gt 160 ] && cmd="${cmd:0:157}..."
  out="$(timeout "$limit" "$@" 2>&1)"; rc=$?
  local dt=$(( $(date +%s) - t ))
  printf '\n===== %s (rc %s, %ss): %s\n%s\n' "$name" "$rc" "$dt" "$*" "$out" >> "$LOGS"
  local status="ok"
  [ "$rc" = 124 ] && status="TIMEOUT (${limit}s)"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && status="FAILED (exit $rc)"
  SUMMARY+=("| $name | $status | $dt |")
  {
    printf '\n## %s: %s, %ss\n\n`%s`\n\n' "$name" "$status" "$dt" "$cmd"
    # the benchmarks print markdown tables; keep table lines and short result lines, drop warnings
    printf '%s\n' "$out" | grep -v -i -e 'warning' -e '^\s*$' -e 'deprecat' | tail -n 80
  } >> "$REPORT.body"
  echo "[$name] $status in ${dt}s" >&2
}

: > "$REPORT.body"
run_step env 30 "$PYBIN" -c "
import jax, jaxlib, subprocess, shutil
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'backend', jax.default_backend())
print('devices:', jax.devices())
for m in ('triton', 'tokamax', 'pydantic', 'tensorboardX'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'n/a:', type(e).__name__)
if shutil.which('nvidia-smi'):
    print(subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,clocks.max.sm,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True).stdout)
"
if [ "$DRY" = 1 ]; then
  run_step check 40 "$PYBIN" -m pytest -q -x tests/pallas_kernels/test_attention.py -k "lower_to_triton" -p no:cacheprovider
else
  JAXEFF_TEST_DEVICE=1 run_step check 90 "$PYBIN" -m pytest -q -m gpu tests/pallas_kernels -p no:cacheprovider
fi
run_step attention 180 "$PYBIN" experiments/bench_attention.py $SMALL $( [ "$DRY" = 0 ] && echo "--iters 5")
if [ "$DRY" = 1 ]; then
  run_step quant 120 "$PYBIN" experiments/bench_quant.py --small
  run_step train 80 "$PYBIN" experiments/bench_train.py --model quickstart --steps 1 --batch 8 --seq 32
else
  run_step quant 120 "$PYBIN" experiments/bench_quant.py --m 1 16 64 4096
  run_step train 80 "$PYBIN" experiments/bench_train.py --model 125m --dtype bfloat16 --steps 10
fi

{
  echo "# device_bench $(date -u +%Y-%m-%dT%H:%MZ) $( [ "$DRY" = 1 ] && echo '(DRY RUN: CPU, tiny shapes, interpret mode; no timing means anything)')"
  echo
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), total $(( $(date +%s) - T0 )) s; full logs: $(basename "$LOGS")"
  echo
  echo "Targets (issue 20): attention fwd >= 1.0x cuDNN, fwd+bwd >= 0.8x cuDNN, decode >= 70% of copy bandwidth,"
  echo "int8 GEMV >= 1.8x bf16, NF4 >= 3x, W8A8 >= 1.5x bf16 at M >= 1024."
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  cat "$REPORT.body"
} > "$REPORT"
rm -f "$REPORT.body"
echo "wrote $REPORT" >&2
for s in "${SUMMARY[@]}"; do case "$s" in *FAILED*|*TIMEOUT*) exit 1 ;; esac; done
exit 0
