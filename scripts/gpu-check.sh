#!/usr/bin/env bash
# Issue 10's GPU check, in one call on the GPU machine (it starts bare, with torch, triton, timm,
# einops, pytest, pytest-xdist and scikit-learn; no installs, the project runs from this tree):
#
#   1. what the machine is (GPU, driver, torch/triton versions, the commit) -> OUTDIR/machine.txt
#   2. the whole test suite with the kernels compiled (TRITON_INTERPRET unset), the gpu-marked
#      tests included: the >2^31-element one, the atomic backward's nondeterminism, and every
#      deterministic-mode test (bit-identical gradients over repeated runs) -> OUTDIR/pytest.log
#   3. stn-bench on the headline cases -> OUTDIR/bench/ (json, csv, md, two PNGs; the json carries
#      GPU, driver, versions, commit and timestamp: commit them under benchmarks/results/)
#
# Usage, from the device tool (the repository's .git does not travel, so name the commit):
#   STN_TRITON_COMMIT=<git rev-parse HEAD here> bash scripts/gpu-check.sh "$OUT"
# Eight files come back, the device tool's most. Each step has its own time limit, so
# the whole fits one 10-minute call; change them with GPU_CHECK_TEST_SECONDS (default 330) and
# GPU_CHECK_BENCH_SECONDS (180), the tests with GPU_CHECK_TESTS (default: the whole suite), the
# pytest processes with GPU_CHECK_WORKERS (8) and the benchmark's arguments with GPU_CHECK_BENCH.
# A step that fails or runs out of time is reported, and the next one still runs; the exit status
# is the first failure's.
set -uo pipefail
OUTDIR="${1:?usage: scripts/gpu-check.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR/bench"
cd "$ROOT"
unset TRITON_INTERPRET
# plugins/: the fused plugin families' distributions, importable from the tree (tests register them)
export PYTHONPATH="$ROOT:$ROOT/plugins/logpolar:$ROOT/plugins/lens${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export STN_TRITON_COMMIT="${STN_TRITON_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
status=0
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log, and remember a failure
    local name=$1 seconds=$2 log=$3
    shift 3
    echo "== $name (limit ${seconds} s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (out of time)')" | tee -a "$log"
    [ "$rc" != 0 ] && [ "$status" = 0 ] && status=$rc
    return 0
}

{
    echo "commit $STN_TRITON_COMMIT"
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} >"$OUTDIR/machine.txt" 2>&1
cat "$OUTDIR/machine.txt"

per_test=()  # a test that hangs is cut at 4 minutes (pytest-timeout, there on the GPU machine)
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 240)
# shellcheck disable=SC2086  # GPU_CHECK_TESTS and GPU_CHECK_BENCH are word lists
step tests "${GPU_CHECK_TEST_SECONDS:-330}" "$OUTDIR/pytest.log" \
    "$PY" -m pytest -q -p no:cacheprovider -n "${GPU_CHECK_WORKERS:-8}" -rs --durations=25 "${per_test[@]}" \
    ${GPU_CHECK_TESTS:-tests}

# shellcheck disable=SC2086
step bench "${GPU_CHECK_BENCH_SECONDS:-180}" "$OUTDIR/bench.log" \
    "$PY" -m stn_triton.benchmarks --out "$OUTDIR/bench" --no-progress \
    ${GPU_CHECK_BENCH:---cases mnist cub-k4 feat-cl --dtypes bfloat16}
exit "$status"
