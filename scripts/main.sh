#!/usr/bin/env bash
# The README's first command: the paper's distorted-digits experiment (defaults: R and RTS, CNN vs
# ST-CNN with an affine transformer, three seeds, scikit-learn's bundled digits, CPU, ~2 minutes on two cores).
# Any option of `stn-digits --help` can be appended, e.g. ./scripts/main.sh --distortions R RTS P E.
source "$(dirname "$0")/env.sh"
python -m stn_triton.integrations.digits "$@"
