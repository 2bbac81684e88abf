#!/usr/bin/env bash
# The README's main command. Until the distorted-digits experiment lands, a short, real
# demonstration of the fused sampler on the CPU (Triton interpreter against the PyTorch reference).
source "$(dirname "$0")/env.sh"
export TRITON_INTERPRET=1
python -m stn_triton.demo "$@"
