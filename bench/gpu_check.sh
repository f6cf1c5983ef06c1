#!/usr/bin/env bash
# ffkern's GPU checks in one call: the GPU tests, the GPU targets, Hinton's recipe, a sweep.
#
#   bench/gpu_check.sh               on a CUDA machine: every stage, about 8 minutes at most
#   bench/gpu_check.sh --dry-run     anywhere: the import set-up and a CPU micro benchmark
#   bench/gpu_check.sh --dry-run --imports-only    the import set-up alone (used by the tests)
#
# Needs only python3 with torch and triton (pytest for the test stage): no network, no
# installs. Logs, tables and JSON go to $OUT when it is set, else ./gpu-results. Each stage
# runs under `timeout`, so one that hangs costs its own budget and the next still runs; the
# exit status is that of the first failed stage (0 when all passed).
#
# Environment knobs: PYTHON (default python3), RECIPE_PRECISION (bf16), SWEEP_PRECISION
# (tf32), and the per-stage limits T_TESTS, T_TARGET, T_RECIPE, T_SWEEP in seconds.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
RESULTS=${OUT:-$PWD/gpu-results}
DRY=0
IMPORTS_ONLY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        --imports-only) IMPORTS_ONLY=1 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$RESULTS"

# ---- import set-up ---------------------------------------------------------------------------
# pyproject.toml installs the top-level kernels/ folder as ffkern.kernels. Without pip (offline,
# no build isolation) we rebuild that layout by hand: a throwaway folder holding ffkern/, whose
# entries are symlinks to the repository's ffkern/* plus kernels -> the repository's kernels/.
# Every Python command then runs with that folder first on PYTHONPATH *and as its working
# directory*: `python3 -m pytest` puts the working directory first on sys.path, and from the
# repository root that would find the real ffkern/ (which lacks kernels/) before the shim.
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/ffkern-shim.XXXXXX")
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/ffkern"
for entry in "$REPO"/ffkern/*; do
    name=$(basename "$entry")
    [[ $name == __pycache__ || $name == kernels ]] && continue
    ln -s "$entry" "$SHIM/ffkern/$name"
done
ln -s "$REPO/kernels" "$SHIM/ffkern/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the GPU tests must compile real kernels

HAS_CUDA=$(cd "$SHIM" && "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)
[[ $HAS_CUDA == 1 ]] || HAS_CUDA=0
if [[ $HAS_CUDA == 0 ]]; then
    export TRITON_INTERPRET=1  # without CUDA, importing the kernels needs the interpreter
fi

echo "== import smoke test (shim $SHIM)"
(cd "$SHIM" && "$PY" - "$REPO" <<'EOF'
import importlib, sys
from pathlib import Path
repo = Path(sys.argv[1]).resolve()
# Where ffkern is pip-installed in editable mode (a developer box), its import hook would
# answer instead of the shim; drop it so this checks what a machine without ffkern sees.
def _editable(finder):
    cls = finder if isinstance(finder, type) else type(finder)
    return cls.__module__.startswith("__editable")
sys.meta_path = [f for f in sys.meta_path if not _editable(f)]
import ffkern, ffkern.kernels
if not Path(ffkern.kernels.__file__).parent.is_symlink():
    sys.exit(f"ffkern.kernels came from {ffkern.kernels.__file__}, not from the shim")
for name in ("ffkern.backends.triton", "ffkern.trainer"):
    importlib.import_module(name)
kernels = Path(ffkern.kernels.__file__).resolve().parent
if kernels != repo / "kernels":
    sys.exit(f"ffkern.kernels resolved to {kernels}, expected {repo / 'kernels'}")
print("ffkern ->", Path(ffkern.__file__).parent)
print("ffkern.kernels ->", kernels)
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton missing:", err)
EOF
) || { echo "import smoke test FAILED"; exit 1; }

if [[ $DRY == 1 || $HAS_CUDA == 0 ]]; then
    [[ $HAS_CUDA == 0 ]] && echo "no CUDA device here: dry run only (no GPU stage runs)"
    if [[ $IMPORTS_ONLY == 0 ]]; then
        echo "== CPU micro benchmark (code paths only; numbers mean nothing)"
        if ! (cd "$SHIM" && timeout 300 "$PY" "$REPO/bench/throughput.py" --config micro \
            --quick --device cpu --json "$RESULTS/dry-run.json"); then
            echo "micro benchmark FAILED"
            exit 1
        fi
    fi
    echo "dry run OK; on a GPU machine this would run: pytest tests/test_gpu.py" \
        "tests/test_kernels.py, throughput.py --config gpu-target, --mnist-recipe-time," \
        "and throughput.py --quick"
    exit 0
fi

# ---- GPU stages ------------------------------------------------------------------------------
STATUS=0
declare -a SUMMARY=()
stage() {  # stage NAME LIMIT_S COMMAND...: run COMMAND from the shim, log to $RESULTS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS rc
    (cd "$SHIM" && timeout --kill-after=10 "$limit" "$@") 2>&1 | tee "$RESULTS/$name.log"
    rc=${PIPESTATUS[0]}
    local verdict="ok"
    if [[ $rc == 124 || $rc == 137 ]]; then
        verdict="TIMEOUT"
    elif [[ $rc != 0 ]]; then
        verdict="FAILED rc=$rc"
    fi
    SUMMARY+=("$(printf '%-14s %-14s %4ds' "$name" "$verdict" $((SECONDS - t0)))")
    if [[ $rc != 0 && $STATUS == 0 ]]; then STATUS=$rc; fi
}

GPU_QUERY=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu
VERSIONS='import sys, torch as m, triton as t
print(sys.version, m.__version__, m.version.cuda, t.__version__)'
stage env 20 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=$GPU_QUERY --format=csv; \
    $PY -c '$VERSIONS'"

if (cd "$SHIM" && "$PY" -c 'import pytest' 2>/dev/null); then
    tests=()
    for t in tests/test_gpu.py tests/test_kernels.py; do
        [[ -f $REPO/$t ]] && tests+=("$REPO/$t")
    done
    if ((${#tests[@]})); then
        stage tests "${T_TESTS:-120}" "$PY" -m pytest -c "$REPO/pyproject.toml" \
            --rootdir "$REPO" -p no:cacheprovider -q "${tests[@]}"
    else
        SUMMARY+=("tests          skipped: no tests/test_gpu.py or tests/test_kernels.py")
    fi
else
    SUMMARY+=("tests          skipped: pytest is not installed for $PY")
fi

stage gpu-target "${T_TARGET:-130}" "$PY" "$REPO/bench/throughput.py" --config gpu-target \
    --json "$RESULTS/gpu-target.json"

stage recipe "${T_RECIPE:-90}" "$PY" "$REPO/bench/throughput.py" --mnist-recipe-time \
    --precision "${RECIPE_PRECISION:-bf16}" --recipe-budget-s 60 --json "$RESULTS/recipe.json"

plot=()
if (cd "$SHIM" && "$PY" -c 'import matplotlib' 2>/dev/null); then
    plot=(--plot "$RESULTS/sweep.png")
else
    SUMMARY+=("plot           skipped: matplotlib is not installed for $PY")
fi
stage sweep "${T_SWEEP:-100}" "$PY" "$REPO/bench/throughput.py" --quick \
    --precision "${SWEEP_PRECISION:-tf32}" --json "$RESULTS/sweep.json" ${plot[@]+"${plot[@]}"}

echo
echo "== summary (logs and JSON in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/summary.txt"
for name in recipe sweep gpu-target; do  # the target table last
    if [[ -f $RESULTS/$name.log ]]; then
        echo
        echo "== $name"
        grep -v '^  ' "$RESULTS/$name.log"  # all but the per-row progress lines
    fi
done
exit "$STATUS"
