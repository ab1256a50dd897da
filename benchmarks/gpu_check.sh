#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and a CUDA build of torch (a few minutes):
# the CUDA tests, a conversion with --device cuda checked by verify, and the reference modules'
# forward against float cuDNN. Nothing is installed: refq runs from this checkout with the
# Python that holds the CUDA torch ($PYTHON, else python3), which also needs typer, rich,
# safetensors, pyyaml, pytest and hypothesis. Every step runs even if one before it failed;
# the exit status says whether all passed.
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() {
    echo "== $*"
    "$@" || { echo "== FAILED ($?): $*"; failed=1; }
}
step "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.__version__, torch.cuda.get_device_name())"
step "$py" -m pytest -q -rs -p no:cacheprovider tests/reference/test_modules.py \
    tests/test_quant.py tests/test_convert.py -k cuda
out=$(mktemp -d)
step "$py" -m refq_cli convert examples/models/example.pt -q configs/int8-per-channel-symmetric.yaml \
    -o "$out/example.refq.safetensors" --device cuda
step "$py" -m refq_cli verify "$out/example.refq.safetensors" --against examples/models/example.pt
step "$py" benchmarks/reference_forward.py --device cuda --rounds 30
exit $failed
