#!/usr/bin/env bash
# Downloads the wheels bench/gpu_check installs on a GPU machine without internet into bench/wheels/ (gitignored):
# Liger-Kernel (the peer the KD loss is compared with; pure Python + Triton) and expecttest (torch.library.opcheck).
# Their dependencies (torch, triton) are the GPU image's own, so they are fetched without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --dest bench/wheels "liger-kernel==0.8.5" "expecttest"
ls -l bench/wheels
