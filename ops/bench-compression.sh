#!/usr/bin/env bash
# Measures `compression.type` on the jobs topic: the ingest daemon
# (`osmvec run --mode ingest`) replays the Maldives base + 180-minute feed to
# a fresh tansu broker once per codec, with the codec and librdkafka's
# statistics set through [kafka.properties]; the daemon logs, at its stop,
# what its jobs producer (jobs only) sent to the broker — librdkafka's
# per-broker txbytes: after compression, all requests — beside the jobs'
# message bytes before compression. Prints a markdown table: bytes per job
# before and after, per codec.
#
# Usage: bash ops/bench-compression.sh    (OSMVEC_BIN, TMPDIR as in ops/bench.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
[ -x "$bin" ] || cargo build --release --locked -p osmvec
command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ] || bash ops/broker.sh install
export PATH="$HOME/.cargo/bin:$PATH"
work=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-compression.XXXXXX")
broker=""
cleanup() { [ -n "$broker" ] && kill "$broker" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export OSMVEC_LOG=warn
data=tests/data/replication/maldives
"$bin" import --store "$work/base" "$data/base-2017-03-01T0749Z.osm.pbf" > /dev/null
"$bin" train --store "$work/base" --out "$work/ckpt" --steps 1 --batch-size 16 > /dev/null
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "| compression.type | jobs | value bytes per job | message bytes per job (value + key) | bytes sent to the broker per job | sent / message bytes | ingest replay s |"
echo "|---|---|---|---|---|---|---|"
for codec in none lz4 zstd gzip; do
  port=$(free_port)
  (cd "$work" && exec tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "memory://tansu/" --cluster-id osmvec-bench > /dev/null 2>&1) &
  broker=$!
  sleep 1
  rm -rf "$work/s"; cp -r "$work/base" "$work/s"
  cat > "$work/osmvec.toml" <<EOF
[kafka.properties]
"compression.type" = "$codec"
"statistics.interval.ms" = 200
EOF
  t0=$(date +%s.%N)
  OSMVEC_LOG=info "$bin" --log-format json run --config "$work/osmvec.toml" --store "$work/s" \
    --source "$data/minute" --checkpoint "$work/ckpt" --brokers "127.0.0.1:$port" \
    --mode ingest --until-caught-up --http-listen off > /dev/null 2> "$work/run-$codec.log"
  t1=$(date +%s.%N)
  kill "$broker"; wait "$broker" 2>/dev/null || true; broker=""
  python3 - "$work/run-$codec.log" "$codec" "$(echo "$t1 - $t0" | bc -l)" <<'PY'
import json, sys
log, codec, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
wire = None
for line in open(log):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    f = r.get("fields", {})
    if "wire" in f:
        wire = json.loads(f["wire"])
assert wire, f"no statistics line in {log}"
jp = wire["producers"]["jobs producer"]
j = jp["topics"]["osmvec.tile-jobs"]
value = wire["payload_bytes"]["osmvec.tile-jobs"]
n = j["records"]
print(f"| {codec} | {n} | {value / n:,.0f} | {j['bytes'] / n:,.0f} | {jp['sent_bytes'] / n:,.0f} "
      f"| {jp['sent_bytes'] / j['bytes']:.3f} | {secs:.1f} |")
PY
done
