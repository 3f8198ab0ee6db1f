#!/usr/bin/env bash
# The one script to run on a GPU machine (docs/gpu.md): what the GPU is, CPU-vs-CUDA agreement tests,
# then the GPU benchmark. Every step has its own timeout; a failed step is reported and the next one
# still runs, and the script exits 1 at the end if any step failed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--smoke | --cpu-tiny] [--skip-tests]

  (no argument)  the full check on a CUDA machine, an estimated 6-8 minutes: nvidia-smi, torch's view of the GPU,
                 the project installed without dependencies, pytest -m cuda tests/test_cuda.py, then
                 benchmarks/bench_gpu.py --device cuda --out "$OUT/gpu.json" (budget 300 s)
  --smoke        the same with the benchmark's tiny sizes (an estimated 1-2 minutes): run it first
  --cpu-tiny     everything on the CPU with tiny sizes and INFODISTILL_CUDA_TESTS_ON_CPU=1, installing
                 nothing: proves the script and the tests run, not that a GPU agrees
  --skip-tests   leave out the pytest step (e.g. the full run right after a smoke run that passed it)
  -h, --help     this text

environment: OUT (default ./gpu-out) receives gpu-check.log and the JSON; PYTHON (default python3);
             BENCH_BUDGET_SECONDS (default 300) bounds the full benchmark.
EOF
}

mode=full
run_tests=1
for argument in "$@"; do
    case "$argument" in
        --smoke) mode=smoke ;;
        --cpu-tiny) mode=cpu-tiny ;;
        --skip-tests) run_tests=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$argument'" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root
OUT="${OUT:-./gpu-out}"
PYTHON="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_SECONDS:-300}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1

failed=()
# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, report how it went, remember a failure.
step() {
    local name=$1 limit=$2 started=$SECONDS status=0
    shift 2
    echo "=== $name (timeout ${limit} s) ==="
    timeout --kill-after=10 "$limit" "$@" || status=$?
    if [ "$status" -eq 0 ]; then
        echo "--- $name: ok, $((SECONDS - started)) s"
    else
        [ "$status" -eq 124 ] && echo "--- $name: TIMED OUT after ${limit} s" || echo "--- $name: FAILED (exit $status)"
        failed+=("$name")
    fi
}

echo "gpu_check: mode $mode, output in $OUT, started $(date -u +%Y-%m-%dT%H:%M:%SZ)"

if [ "$mode" = cpu-tiny ]; then
    device=cpu
    export INFODISTILL_CUDA_TESTS_ON_CPU=1
    echo "=== nvidia-smi: not run (--cpu-tiny) ==="
else
    device=cuda
    step "nvidia-smi" 30 nvidia-smi
fi

step "torch's view of the device" 120 "$PYTHON" - "$device" <<'EOF'
import platform
import sys

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA runtime", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for index in range(torch.cuda.device_count()):
    properties = torch.cuda.get_device_properties(index)
    print(f"cuda:{index}: {properties.name}, capability {properties.major}.{properties.minor}, "
          f"{properties.total_memory / 2**30:.1f} GiB, {properties.multi_processor_count} SMs, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
print("TF32: cudnn", torch.backends.cudnn.allow_tf32, "| matmul", torch.backends.cuda.matmul.allow_tf32)
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
EOF

step "python packages the project imports" 60 "$PYTHON" - <<'EOF'
import importlib
import sys

missing = []
for name in ("numpy", "safetensors", "tqdm", "yaml", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"missing: {', '.join(missing)} (carry them as wheels: docs/gpu.md)")
EOF

# The project itself: from this tree, without touching its dependencies (the GPU machine has its own PyTorch).
if "$PYTHON" -c 'import infodistill, pathlib, sys; sys.exit(pathlib.Path(infodistill.__file__).resolve().parents[1] != pathlib.Path("src").resolve())' 2>/dev/null; then
    echo "=== install: infodistill already imports from this tree ==="
elif [ "$mode" = cpu-tiny ]; then
    echo "=== install: not run (--cpu-tiny installs nothing); PYTHONPATH=src ==="
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    # --no-build-isolation: the machine reaches no package index, so the build uses the installed setuptools
    echo "=== pip install --no-deps -e . (timeout 180 s) ==="
    if ! timeout --kill-after=10 180 "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .; then
        echo "--- the install failed; the package is pure Python, so PYTHONPATH=src serves instead"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
step "import infodistill" 60 "$PYTHON" -c 'import infodistill; print("infodistill", infodistill.__version__, "from", infodistill.__file__)'

if [ "$run_tests" -eq 1 ]; then
    step "pytest -m cuda tests/test_cuda.py" 240 \
        "$PYTHON" -m pytest -m cuda -p no:cacheprovider -q -rs tests/test_cuda.py
fi

case "$mode" in
    full) step "bench_gpu.py (full, budget ${BUDGET} s)" "$((BUDGET + 120))" \
        "$PYTHON" benchmarks/bench_gpu.py --device cuda --budget-seconds "$BUDGET" --out "$OUT/gpu.json" ;;
    smoke) step "bench_gpu.py --tiny" 180 \
        "$PYTHON" benchmarks/bench_gpu.py --tiny --device cuda --out "$OUT/gpu-smoke.json" ;;
    cpu-tiny) step "bench_gpu.py --tiny --device cpu" 120 \
        "$PYTHON" benchmarks/bench_gpu.py --tiny --device cpu --out "$OUT/gpu-tiny.json" ;;
esac

if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED steps: ${failed[*]} (log: $OUT/gpu-check.log)"
    exit 1
fi
echo "gpu_check: every step passed ($SECONDS s; log and JSON in $OUT)"
