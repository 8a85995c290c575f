#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds
# once (release profile, shared by tests and benchmarks; `cargo test` builds
# target/release/osmvec too, see daemon/tests/cli.rs), runs every test,
# and ends with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash ops/install.sh --deps-only
# The Kafka-protocol broker the daemon tests start (cargo install, once).
bash ops/broker.sh install
# Prometheus (scrapes the daemon in tests/observability.rs; promtool checks
# ops/prometheus) and Chromium (loads the drift page headless).
bash ops/check-observability.sh --install
# The Python readers no one here wrote (pyarrow, geopandas, kafka-python,
# cbor2) that tests/export.rs and tests/daemon.rs check outputs with.
bash ops/py-readers.sh > /dev/null
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  apt-cache show chromium >/dev/null 2>&1 || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --locked --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
               END { printf "%d passed, %d failed", p, f }' "$log")
echo "ops/test.sh: finished in $(( $(date +%s) - start )) s" >&2
echo "tests: $summary"
exit "$status"
