#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA checks that wait for one (docs/benchmarks.md, "CUDA:
# waiting for a GPU"). Needs a CUDA 12.x/13.0-13.4 toolkit (nvcc on PATH, or the wheels of
# scripts/cuda-toolchain.sh with the real driver installed) and the crates already fetched.
#   1. our CUDA ops against the CPU path, forward and every gradient (crates/lean-ops/tests/cuda.rs);
#   2. latency and training step on the GPU, ours (`lean bench --device cuda`) against PyTorch
#      eager on the same GPU (benches/pytorch/bench_pytorch.py --device cuda; needs torch);
#   3. training throughput on the GPU, lean against dense (images/s from summary.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
  export CUDA_COMPUTE_CAP
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv || true
cargo test --release -p lean-ops --features cuda --test cuda -- --nocapture
cargo build --release -p lean-cli --features cuda
models="lean_resnet18_cifar resnet18_cifar mobilenet_v2_075_cifar shufflenet_v2_x1_0_cifar"
# shellcheck disable=SC2086
target/release/lean bench --device cuda $models --batch-sizes 1,64,256 --train --reps 20
if python3 -c 'import torch, torchvision; assert torch.cuda.is_available()' 2>/dev/null; then
  # shellcheck disable=SC2086
  python3 benches/pytorch/bench_pytorch.py --device cuda $models --batch-sizes 1,64,256 --train --reps 20
fi
for model in lean_resnet18_cifar resnet18_cifar; do
  out="$(mktemp -d)"
  target/release/lean train --device cuda --model "$model" --epochs 1 --limit-train 8192 \
    --limit-val 512 -b 128 --output "$out" >/dev/null
  echo "$model: $(tail -1 "$out/summary.csv" | awk -F, '{print $NF}') training images/s on the GPU"
done
