#!/usr/bin/env bash
# The README's test command: the whole suite on the CPU, Triton kernels in Triton's interpreter.
source "$(dirname "$0")/env.sh"
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 STN_TRITON_REQUIRE_PLUGIN=1
# worksteal: an idle worker takes queued tests from the busy one, so a slow test near the end does not
# leave a core idle
python -m pytest -n "${STN_TRITON_TEST_WORKERS:-2}" --dist worksteal -q "$@"
