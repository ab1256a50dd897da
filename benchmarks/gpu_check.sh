#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and a CUDA build of torch (about two minutes):
# the CUDA tests, a conversion with --device cuda checked by verify, and the reference modules'
# forward against float cuDNN.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/reference/test_modules.py -k cuda
out=$(mktemp -d)
refq convert examples/models/example.pt -q configs/int8-per-channel-symmetric.yaml \
    -o "$out/example.refq.safetensors" --device cuda
refq verify "$out/example.refq.safetensors" --against examples/models/example.pt
python benchmarks/reference_forward.py --device cuda --rounds 30
