#!/usr/bin/env bash
# Soak: osmvec's ingest daemon, two embedding workers and the daemon's HTTP
# side, run for a given time on an endless replication feed, with RSS and
# open files of every process sampled each minute.
#
# The feed is the bundled Maldives minutely feed (180 real diffs) replayed in
# a loop by tests/fixtures/http_source.py --loop: sequence S is the feed's
# ((S-1) mod 180) + 1, with every object's version raised by
# SHIFT_VERSIONS per pass (--shift-versions), so every pass changes the map
# again and re-embeds what pass 1 did; every pass ends in the content of
# sequence 180, versions shifted. SHIFT_VERSIONS=0 replays the versions as
# they are: later passes then dirty nothing (the store has those versions).
# One sequence is published every PUBLISH_EVERY seconds (5: twelve times the
# planet's minutely rate).
# A light HTTP load runs meanwhile (ops/soak-monitor.py: /metrics, /healthz,
# /v1/tiles pages, /v1/embed, a small /v1/tiles.parquet, about one request
# a second). At the end the source is restarted with the feed frozen at the
# next multiple of 180, the daemon catches up, and its store is compared
# object for object with a store that replicated the 180 diffs once; every
# process must then stop on SIGTERM with exit 0.
#
# Usage: bash ops/soak.sh [MINUTES] [DIR]     (default 60 minutes, target/soak)
#   PUBLISH_EVERY (s, default 5), SAMPLE_SECONDS (default 60), PORT (broker, 19096),
#   BROKER (memory, the default, or sqlite), OSMVEC_BIN (default target/release/osmvec),
#   SHIFT_VERSIONS (default 1000000; 0: later passes change nothing)
# Writes DIR/samples.csv, DIR/summary.json and, with ops/py-readers.sh's
# matplotlib, DIR/soak.png (docs/reliability.md shows one).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
minutes=${1:-60}
dir=${2:-$repo/target/soak}
port=${PORT:-19096}
every=${PUBLISH_EVERY:-5}
sample=${SAMPLE_SECONDS:-60}
shift_versions=${SHIFT_VERSIONS:-1000000}
bash ops/install.sh >&2
bash ops/broker.sh install
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
feed=$repo/tests/data/replication/maldives/minute
base=$repo/tests/data/replication/maldives/base-2017-03-01T0749Z.osm.pbf
export OSMVEC_LOG=${OSMVEC_LOG:-info}
rm -rf "$dir" && mkdir -p "$dir"

"$bin" import --store "$dir/store" "$base" >/dev/null
"$bin" train --store "$dir/store" --out "$dir/ckpt" --steps 1 --batch-size 16 >/dev/null
# The reference: the same base and the 180 diffs, replicated once.
"$bin" import --store "$dir/reference" "$base" >/dev/null
"$bin" replicate --store "$dir/reference" --source "$feed" --until-caught-up >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
# Memory storage by default: on 2026-12-02 tansu 0.6.0's SQLite storage
# panicked one minute into the soak (docs/reliability.md). BROKER=sqlite
# repeats that run.
if [ "${BROKER:-memory}" = sqlite ]; then
  OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh start-sqlite "$port" "$dir/broker.db"
else
  OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh start "$port"
fi
brokers=127.0.0.1:$port

source_port=0
start_source() { # extra flags... -> sets source_pid, source_url, source_port
  local fifo=$dir/source.port
  rm -f "$fifo"
  # The same port on a restart: the daemon keeps the URL it was given.
  python3 tests/fixtures/http_source.py --loop 180 --shift-versions "$shift_versions" "$@" \
    "$feed" "$source_port" > "$fifo" &
  source_pid=$!
  for _ in $(seq 100); do grep -q PORT "$fifo" 2>/dev/null && break; sleep 0.1; done
  source_port=$(awk '/PORT/ {print $2}' "$fifo")
  source_url=http://127.0.0.1:$source_port/
}
start_source --hide-after 1 --publish-every "$every"
pids+=("$source_pid")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port)
"$bin" run --mode ingest --store "$dir/store" --checkpoint "$dir/ckpt" --source "$source_url" \
  --brokers "$brokers" --http-listen "127.0.0.1:$http" --poll-interval 1 --json \
  > "$dir/ingest.jsonl" 2> "$dir/ingest.log" &
ingest=$!
pids+=("$ingest")
workers=()
worker_ports=()
for i in 1 2; do
  wp=$(free_port)
  "$bin" worker --brokers "$brokers" --group soak --checkpoint "$dir/ckpt" --batch 64 --json \
    --http-listen "127.0.0.1:$wp" > "$dir/w$i.jsonl" 2> "$dir/w$i.log" &
  workers+=($!)
  worker_ports+=("$wp")
  pids+=($!)
done
broker_pid=$(cat "$dir/broker/pid")

python3 ops/soak-monitor.py --dir "$dir" --minutes "$minutes" --sample-seconds "$sample" \
  --daemon "http://127.0.0.1:$http" --source "$source_url" \
  --proc "ingest=$ingest" --proc "worker1=${workers[0]}" --proc "worker2=${workers[1]}" \
  --proc "broker=$broker_pid" --proc "source=$source_pid" \
  --worker "http://127.0.0.1:${worker_ports[0]}" --worker "http://127.0.0.1:${worker_ports[1]}"

# Freeze the feed at the end of the current pass and let the daemon catch up.
published=$(curl -sf "${source_url}state.txt" | awk -F= '/sequenceNumber/ {print $2}')
final=$(( (published + 179) / 180 * 180 ))
kill "$source_pid"; wait "$source_pid" 2>/dev/null || true
start_source --hide-after "$final"
pids+=("$source_pid")
echo "soak: feed frozen at sequence $final (published $published); waiting for the daemon" >&2
caught_up=false
for _ in $(seq 1800); do
  seq=$(curl -sf "http://127.0.0.1:$http/metrics" | awk '/^osmvec_replication_sequence / {print $2}')
  if [ "${seq%.*}" = "$final" ]; then caught_up=true; break; fi
  sleep 1
done
echo "soak: daemon at sequence ${seq%.*} (caught up: $caught_up)" >&2
sleep 20 # the outbox drains, the workers finish their last batches
# Content, not versions: the loop shifted those.
unversioned() { sed -E 's/^([nwr][0-9]+) v[0-9]+ /\1 /'; }
"$bin" export --store "$dir/store" --format opl | unversioned > "$dir/store.opl"
"$bin" export --store "$dir/reference" --format opl | unversioned > "$dir/reference.opl"
same=false
cmp -s "$dir/store.opl" "$dir/reference.opl" && same=true
codes=()
for p in "$ingest" "${workers[@]}"; do
  kill -TERM "$p"
  set +e; wait "$p"; codes+=($?); set -e
done
python3 - "$dir" "$final" "$same" "$caught_up" "${seq%.*}" "${codes[@]}" <<'PY'
import json, sys
d, final, same = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "true"
caught_up, reached = sys.argv[4] == "true", sys.argv[5]
codes = [int(c) for c in sys.argv[6:]]
s = json.load(open(f"{d}/summary.json"))
s.update({"final_sequence": final, "passes": final / 180, "caught_up": caught_up,
          "daemon_sequence": int(reached) if reached.isdigit() else None,
          "store_equals_reference": same,
          "exit_codes": dict(zip(["ingest", "worker1", "worker2"], codes))})
json.dump(s, open(f"{d}/summary.json", "w"), indent=1)
print(json.dumps(s, indent=1))
ok = caught_up and same and all(c == 0 for c in codes)
sys.exit(0 if ok else 1)
PY
if py=$(bash ops/py-readers.sh 2>/dev/null); then
  "$py" ops/plot-soak.py "$dir/samples.csv" "$dir/soak.png" || true
fi
