#!/usr/bin/env bash
# The GPU checks of the embedding stage, in one run on a GPU machine (CI has none):
#   1. the device-decode tests with device="cuda" (nvJPEG) beside "cpu";
#   2. embeddings of actor-decoded (nvJPEG) images against the CPU tasks' decode (cosine >= 0.999);
#   3. embedding throughput, decoding in the actor (nvJPEG) and in the CPU tasks, against the
#      model alone on pre-decoded tensors and against a plain PyTorch loop;
#   4. the head on the GPU (bench/head_fit.py --device cuda, bench/scale.py).
# Usage: bash bench/gpu_check.sh [images]   (after `make install`; figures go to docs/BENCHMARKS.md).
# The embedding checks (1-3) come first; the head's (4) take longest, so a short device budget
# may stop the run there and still keep 1-3.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES="${1:-4096}"
PY=.venv/bin/python
export RAY_AUTH_MODE=disabled
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
$PY -m pytest -q tests/embed/test_device_decode.py
$PY bench/decode_agreement.py --model ViT-B-16 --images 512
$PY bench/embed_throughput.py --model ViT-B-16 --images "$IMAGES" --batch 256 embed.decode=actor
$PY bench/embed_throughput.py --model ViT-B-16 --images "$IMAGES" --batch 256 embed.decode=tasks
$PY bench/head_fit.py --device cuda
$PY bench/scale.py
