#!/usr/bin/env bash
# A CUDA toolchain for building lean-convnets' `cuda` feature on a machine without a GPU or a
# system CUDA: NVIDIA's CUDA 13 wheels from PyPI in a virtual environment.
#
#   scripts/cuda-toolchain.sh            # install (once) and print the environment to export
#   scripts/cuda-toolchain.sh check      # install, then `cargo check` the CLI with --features cuda,nccl
#   scripts/cuda-toolchain.sh build [FEATURES]   # install, then build (and link) target/release/lean
#                                        with FEATURES (default lean-cli/cuda; lean-cli/nccl adds NCCL)
#
# Why these versions: candle 0.11.1's cudarc accepts CUDA 11.4-12.9 and 13.0-13.4 (its build
# script panics on newer ones); the meta-package pins matching compiler, headers and libraries
# (installing `nvidia-cuda-nvcc` alone pulls mismatched 13.5 crt/nvvm packages). The default is
# 13.0: candle's kernels are embedded as PTX, which the driver compiles when the program starts,
# and a driver rejects PTX from a newer toolkit than its own (13.0 is what driver 580, the first
# CUDA 13 driver, runs). There is no GPU to query for its compute capability, so
# CUDA_COMPUTE_CAP defaults to 90 (Hopper).
# Environment: CUDA_VENV (default .venv-cuda), CUDA_TOOLKIT_VERSION (default 13.0.2),
# CUDA_COMPUTE_CAP.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CUDA_VENV:-.venv-cuda}"
if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 not found: it installs the CUDA wheels (apt-get install python3 python3-venv)" >&2
  exit 1
fi
version="${CUDA_TOOLKIT_VERSION:-13.0.2}"
if [ "$(cat "$venv/nvcc-installed" 2>/dev/null)" != "$version" ]; then
  # A fresh venv: pip does not downgrade every part of another version (mixed nvcc and nvvm
  # versions fail with "Unsupported .version").
  rm -rf "$venv"
  python3 -m venv "$venv"
  # nvcc's own parts (nvvm, crt) are not pinned by the meta-package: pin them to the same minor
  # version, or a newer nvvm writes PTX that this ptxas rejects.
  minor="${version%.*}"
  "$venv/bin/pip" install -q "cuda-toolkit[nvcc,cccl,cudart,nvrtc,cublas,curand]==$version" \
    "nvidia-nvvm==$minor.*" "nvidia-cuda-crt==$minor.*"
  echo "$version" > "$venv/nvcc-installed"
fi
cuda_home="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -1
case "${1:-env}" in
  check)
    # Type-checks every crate with candle's CUDA backend (most of the time goes into
    # candle-kernels' PTX). Linking would also need plain-named symlinks to the wheels'
    # versioned libraries and a libcuda.so stub; running needs a GPU.
    # nccl (GPU data-parallel training) needs the mpi feature: Open MPI and libclang installed.
    cargo check --release -p lean-cli --features lean-cli/cuda,lean-cli/nccl
    ;;
  build)
    # The wheels ship versioned libraries only (libcublas.so.13) and no driver: give the linker
    # plain-named symlinks, and stubs of the driver (libcuda) and NCCL built from cudarc's own
    # declarations. The stubs carry the real libraries' sonames (libcuda.so.1, libnccl.so.2),
    # so on a GPU machine the binary loads the installed driver and NCCL, never the stubs.
    lib="$cuda_home/lib"
    for f in "$lib"/lib*.so.*; do
      base="${f##*/}"; plain="$lib/${base%%.so.*}.so"
      [ -e "$plain" ] || ln -sfn "$base" "$plain"  # -f: replaces a link left dangling by another version
    done
    # The stubs are generated from cudarc's sources: fetch them first (a fresh checkout has
    # never unpacked cudarc, which only the cuda feature needs).
    cargo fetch --quiet
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)"
    for pair in "cuda:driver:libcuda.so.1" "nccl:nccl:libnccl.so.2"; do
      IFS=: read -r name dir soname <<<"$pair"
      if [ ! -e "$lib/lib$name.so" ]; then
        grep -ho 'fn [A-Za-z0-9_]*(' "$cudarc/src/$dir/sys/mod.rs" | sed 's/fn \(.*\)(/void \1(void) {}/' | sort -u > "$venv/stub-$name.c"
        cc -shared -fPIC -Wl,-soname,"$soname" -o "$lib/lib$name.so" "$venv/stub-$name.c"
      fi
    done
    cargo build --release -p lean-cli --features "${2:-lean-cli/cuda}"
    echo "built target/release/lean with ${2:-lean-cli/cuda}; on a GPU machine run it with LD_LIBRARY_PATH=$lib"
    ;;
  env)
    echo "export CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP PATH=$CUDA_HOME/bin:\$PATH"
    ;;
  *)
    echo "usage: scripts/cuda-toolchain.sh [env|check|build]" >&2
    exit 2
    ;;
esac
