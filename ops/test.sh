#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds
# once (release profile, shared by tests and benchmarks), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash ops/install.sh
cargo test --release --locked --workspace
echo "ops/test.sh: finished in $(( $(date +%s) - start )) s" >&2
