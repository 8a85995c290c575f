#!/usr/bin/env bash
# Embedding workers: tiles/s with 1 and with 2 `osmvec worker`s, beside the
# single-process daemon doing the same work, and the size of a job, in one
# run. The Andorra base and its 35 daily diffs are ingested once (`osmvec run
# --mode ingest`: one job per dirty tile on osmvec.tile-jobs of a local tansu
# broker with SQLite storage); then a consumer group of 1 worker, and a fresh
# group of 2, each embed every job. The figure is jobs / (time from the first
# worker's start to the last batch line). The baseline: `osmvec run` (embed
# mode, same flags) over the same base and diffs from a copy of the imported
# store; its figure is tiles embedded / (its whole run, applying the diffs
# included). Prints a markdown table; figures go into docs/scaling.md.
#
# Usage: bash ops/bench-workers.sh   (PORT, default 19094)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash ops/install.sh
bash ops/broker.sh install
bin=$repo/target/release/osmvec
port=${PORT:-19094}
dir=${OSMVEC_BENCH_DIR:-$repo/target/bench-workers}
data=$repo/tests/data/replication/andorra
export OSMVEC_LOG=${OSMVEC_LOG:-warn}
rm -rf "$dir" && mkdir -p "$dir"
"$bin" import --store "$dir/store" "$data/base-2017-01-15T0000Z.osm.pbf" >/dev/null
"$bin" train --store "$dir/store" --out "$dir/ckpt" --steps 1 --batch-size 16 >/dev/null
cp -r "$dir/store" "$dir/single"
OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh start-sqlite "$port" "$dir/broker.db"
trap 'OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh stop; pkill -f "osmvec worker --brokers 127.0.0.1:$port" || true' EXIT
brokers=127.0.0.1:$port
"$bin" run --mode ingest --store "$dir/store" --checkpoint "$dir/ckpt" --source "$data/day" \
  --brokers "$brokers" --until-caught-up --http-listen off --json > "$dir/ingest.jsonl"
jobs=$(python3 -c "import json; print(sum(json.loads(l)['jobs_queued'] for l in open('$dir/ingest.jsonl')))")

run_group() { # n -> seconds
  local n=$1 group=bench-$1 i
  local t0 pids=()
  t0=$(date +%s.%N)
  for i in $(seq "$n"); do
    "$bin" worker --brokers "$brokers" --group "$group" --checkpoint "$dir/ckpt" --batch 64 --json --http-listen off > "$dir/w$n-$i.jsonl" &
    pids+=($!)
  done
  while :; do
    done_jobs=$(cat "$dir"/w"$n"-*.jsonl | python3 -c "import json,sys; print(sum(json.loads(l)['jobs'] for l in sys.stdin))")
    [ "$done_jobs" -ge "$jobs" ] && break
    sleep 0.5
  done
  local t1
  t1=$(date +%s.%N)
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  python3 -c "print(round($t1 - $t0, 2))"
}
s1=$(run_group 1)
s2=$(run_group 2)
# The single process, on topics of its own.
t0=$(date +%s.%N)
"$bin" run --store "$dir/single" --checkpoint "$dir/ckpt" --source "$data/day" \
  --brokers "$brokers" --until-caught-up --http-listen off --json \
  --topic-embeddings single.tile-embeddings --topic-changes single.changes \
  --topic-models single.models > "$dir/single.jsonl"
t1=$(date +%s.%N)
s0=$(python3 -c "print(round($t1 - $t0, 2))")
tiles=$(python3 -c "import json; print(sum(json.loads(l)['tiles_embedded'] + json.loads(l)['tiles_removed'] for l in open('$dir/single.jsonl')))")
python3 - "$dir" "$jobs" "$s1" "$s2" "$tiles" "$s0" <<'PY'
import json, sys, glob
d, jobs, s1, s2 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
tiles, s0 = int(sys.argv[5]), float(sys.argv[6])
lines = [json.loads(l) for f in glob.glob(f"{d}/w1-*.jsonl") for l in open(f)]
size = sum(l["job_bytes"] for l in lines) / max(1, sum(l["jobs"] for l in lines))
r0 = tiles / s0
print(f"""## Embedding workers (Andorra base + 35 daily diffs, {jobs} jobs)

| topology | tiles | wall time (incl. start-up, model load) | tiles/s | vs single process |
|---|---|---|---|---|
| single process (`osmvec run`, diffs applied too) | {tiles} | {s0} s | {r0:.0f} | 1.00 |
| 1 worker | {jobs} | {s1} s | {jobs/s1:.0f} | {jobs/s1/r0:.2f} |
| 2 workers (one machine) | {jobs} | {s2} s | {jobs/s2:.0f} | {jobs/s2/r0:.2f} |

Mean job size: {size/1024:.1f} KiB (CBOR: the tile graph + its coarse context graph).
""")
PY
