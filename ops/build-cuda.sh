#!/usr/bin/env bash
# Builds osmvec with the `cuda` feature on a machine without a GPU or a CUDA
# install, from PyPI wheels only, idempotently:
#   1. installs CUDA 13.0's compiler (nvcc, cicc/nvvm, crt headers), runtime,
#      cuBLAS, cuRAND and NVRTC wheels into $OSMVEC_CUDA_DIR
#      (default ~/.cache/osmvec/cuda-13.0) with pip --target;
#   2. adds the unversioned .so names the linker wants, and a stub
#      libcuda.so (soname libcuda.so.1) exporting every driver function
#      cudarc declares: the driver itself comes with the GPU machine's
#      driver, never from here;
#   3. runs `cargo build --release --features cuda` into target/cuda (a
#      separate target dir: the CPU build in target/ stays as it is).
# CUDA 13.0 matches the driver (580) and nvcc of this project's GPU machines
# (.library/device/KINDS.md). The PTX of osmvec's own kernels and of
# candle's is compiled for compute capability $CUDA_COMPUTE_CAP (default 90,
# Hopper: H100/H200).
#
# Usage: bash ops/build-cuda.sh [--check]   (--check: only print the toolchain)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${OSMVEC_CUDA_DIR:-$HOME/.cache/osmvec/cuda-13.0}
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85
)
root=$dir/nvidia/cu13
if [ ! -f "$dir/.complete" ]; then
  echo "ops/build-cuda.sh: installing CUDA 13.0 wheels into $dir" >&2
  rm -rf "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "${wheels[@]}" >&2
  touch "$dir/.complete"
fi
[ -x "$root/bin/nvcc" ] || { echo "ops/build-cuda.sh: no nvcc in $root/bin" >&2; exit 1; }
# nvcc.profile looks for cicc in $TOP/nvvm/bin and headers in $TOP/include.
if [ ! -e "$root/nvvm" ] && [ -d "$dir/nvidia/cu13/nvvm" ]; then :; fi
for lib in cublas cublasLt curand nvrtc cudart; do
  so=$(ls "$root/lib/lib$lib.so."* 2>/dev/null | grep -v builtins | grep -v '\.alt\.' | head -1 || true)
  [ -n "$so" ] && ln -sf "$(basename "$so")" "$root/lib/lib$lib.so"
done
# The driver stub: every `cu*` function cudarc's driver bindings declare.
stub=$root/lib/stubs/libcuda.so
if [ ! -f "$stub" ]; then
  mkdir -p "$root/lib/stubs"
  sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys 2>/dev/null | head -1)
  if [ -z "$sys" ]; then cargo fetch --locked >/dev/null; sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys | head -1); fi
  grep -rhoE '\bfn cu[A-Za-z0-9_]+\(' "$sys" | sed 's/^fn //; s/($//' | sort -u |
    awk '{printf "void %s(void) {}\n", $1}' > "$root/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib/stubs/libcuda_stub.c"
fi
export CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root
export PATH=$root/bin:$root/nvvm/bin:$PATH
export LIBRARY_PATH=$root/lib:$root/lib/stubs:${LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$root/lib:${LD_LIBRARY_PATH:-}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export NVCC=$root/bin/nvcc
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$root/lib -L native=$root/lib/stubs"
nvcc --version | tail -2 >&2
if [ "${1:-}" = "--check" ]; then exit 0; fi
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --locked -p osmvec --features cuda
echo "ops/build-cuda.sh: built ${CARGO_TARGET_DIR:-target/cuda}/release/osmvec (CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute $CUDA_COMPUTE_CAP)" >&2
