#!/usr/bin/env bash
# Fuzzes diff application for a given time: libFuzzer (cargo-fuzz, nightly
# Rust) on graphstore/fuzz/fuzz_targets/apply_osc.rs, `read_osc` → `commit`
# on the imported Maldives base, seeded with the 180 Maldives minutely diffs
# (decompressed, plus five gzipped) and an osmChange dictionary.
#
# Usage: bash ops/fuzz.sh [MINUTES]   (default 30; one libFuzzer process)
# Installs cargo-fuzz and the nightly toolchain when missing. RocksDB's C++
# is not compiled again: the release build's librocksdb.a is linked
# (ROCKSDB_LIB_DIR), so run `bash ops/install.sh` first. Prints libFuzzer's
# final statistics; a crash leaves its input in graphstore/fuzz/artifacts/
# (replay: cargo +nightly fuzz run apply_osc FILE). The log is in
# target/fuzz/fuzz.log. Results go into docs/reliability.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
minutes=${1:-30}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
lib=$(ls -t target/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1 || true)
if [ -n "$lib" ]; then
  export ROCKSDB_LIB_DIR=$repo/$(dirname "$lib") ROCKSDB_STATIC=1
else
  echo "ops/fuzz.sh: no release build of RocksDB found; compiling it for the fuzzer (about 25 minutes)" >&2
fi
corpus=graphstore/fuzz/corpus/apply_osc
mkdir -p "$corpus" target/fuzz
for f in tests/data/replication/maldives/minute/000/000/*.osc.gz; do
  s=$(basename "$f" .osc.gz)
  [ -f "$corpus/maldives-$s.osc" ] || gzip -dc "$f" > "$corpus/maldives-$s.osc"
done
for s in 001 050 100 150 180; do
  cp -n "tests/data/replication/maldives/minute/000/000/$s.osc.gz" "$corpus/maldives-$s.osc.gz"
done
cd graphstore/fuzz
cargo +nightly fuzz build --release apply_osc
set +e
cargo +nightly fuzz run --release apply_osc corpus/apply_osc -- \
  -max_total_time=$(( minutes * 60 )) -dict=osc.dict -max_len=262144 -timeout=20 \
  -rss_limit_mb=4096 -print_final_stats=1 > "$repo/target/fuzz/fuzz.log" 2>&1
status=$?
grep -E '^#[0-9]+ +(INITED|DONE)|^Done|^stat::|ERROR|panicked|SUMMARY|Test unit written' "$repo/target/fuzz/fuzz.log" | tail -30
set -e
ls artifacts/apply_osc 2>/dev/null | sed 's/^/finding: /' || true
exit "$status"
