#!/usr/bin/env bash
# Freshness and replay benchmark of the daemon on the bundled Maldives feed
# (180 real minutes, 2017-03-01 07:49Z onwards), in one run:
#   1. import the Maldives base; train a 30-step model (kept and reused);
#   2. start a local tansu broker (memory storage) on $PORT;
#   3. the import backlog: the daemon embeds and publishes every tile
#      (timed: this is what re-embedding everything costs, the naive
#      alternative to incremental updates);
#   4. freshness: diffs published one by one on a loopback HTTP source, the
#      daemon polling it every 0.1 s; for each diff, the time from its
#      publication to its last tile embedding read back from the broker
#      (daemon/examples/freshness.rs): p50/p90/p99/max;
#   5. replay: the whole feed available at once, from the post-backlog
#      store, `osmvec run --until-caught-up`, with the default debounce (2 s)
#      and with none; speed = 180 minutes / wall time;
#   6. steps 4 and 5 (debounce 0) again with context-dirty pruning off
#      (OSMVEC_CONTEXT_PRUNING=false: a dirty coarse tile re-embeds every
#      child): tiles re-embedded per diff with and without it.
# Prints a markdown summary; figures go into docs/benchmarks.md by hand.
#
# Usage: bash ops/bench-freshness.sh      (environment: PORT, default 19093;
#        OSMVEC_BENCH_DIR, default target/bench-freshness)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash ops/install.sh
bash ops/broker.sh install
cargo build --release --locked -p osmvec --example freshness
bin=$repo/target/release/osmvec
port=${PORT:-19093}
dir=${OSMVEC_BENCH_DIR:-$repo/target/bench-freshness}
data=$repo/tests/data/replication/maldives
mkdir -p "$dir"
export OSMVEC_LOG=${OSMVEC_LOG:-warn}
now() { date +%s.%N; }

rm -rf "$dir/store" "$dir/replay-store" "$dir/replay-store-0" "$dir/store-np" "$dir/replay-store-0-np"
"$bin" import --store "$dir/store" "$data/base-2017-03-01T0749Z.osm.pbf" >/dev/null
if [ ! -f "$dir/ckpt/checkpoint.json" ]; then
  "$bin" train --store "$dir/store" --out "$dir/ckpt" --steps 30 --batch-size 64 >/dev/null
fi
tiles=$("$bin" stats --store "$dir/store" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tiles"])' 2>/dev/null || echo "?")

OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh stop >/dev/null 2>&1 || true
OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh start "$port"
trap 'OSMVEC_BROKER_DIR=$dir/broker bash ops/broker.sh stop' EXIT
brokers=127.0.0.1:$port

# 3. The backlog, with a source that shows sequence 0 only.
python3 tests/fixtures/http_source.py --dir "$data/minute" --port 0 --hide-after 0 > "$dir/http0" &
server=$!
for _ in $(seq 50); do grep -q '^PORT ' "$dir/http0" 2>/dev/null && break; sleep 0.1; done
t0=$(now)
"$bin" run --store "$dir/store" --checkpoint "$dir/ckpt" --source "http://127.0.0.1:$(sed -n 's/^PORT //p' "$dir/http0")" \
  --brokers "$brokers" --until-caught-up --http-listen off --json > "$dir/backlog.jsonl"
t1=$(now)
kill $server
backlog_s=$(python3 -c "print(round($t1 - $t0, 1))")
embedded=$(python3 -c "import json; print(sum(json.loads(l)['tiles_embedded'] for l in open('$dir/backlog.jsonl')))")
cp -r "$dir/store" "$dir/replay-store"
cp -r "$dir/store" "$dir/replay-store-0"
cp -r "$dir/store" "$dir/store-np"
cp -r "$dir/store" "$dir/replay-store-0-np"

# 4. Freshness.
target/release/examples/freshness --osmvec "$bin" --store "$dir/store" --checkpoint "$dir/ckpt" \
  --feed "$data/minute" --brokers "$brokers" --last 180 --poll-interval 0.1 > "$dir/freshness.json"

OSMVEC_CONTEXT_PRUNING=false target/release/examples/freshness --osmvec "$bin" --store "$dir/store-np" --checkpoint "$dir/ckpt" \
  --feed "$data/minute" --brokers "$brokers" --last 180 --poll-interval 0.1 --topic osmvec.tile-embeddings.np > "$dir/freshness-np.json"

# 5. Replay of the whole feed.
replay() { # store debounce -> seconds
  python3 tests/fixtures/http_source.py --dir "$data/minute" --port 0 > "$dir/http1" &
  local s=$!
  for _ in $(seq 50); do grep -q '^PORT ' "$dir/http1" 2>/dev/null && break; sleep 0.1; done
  local a b
  a=$(now)
  "$bin" run --store "$1" --checkpoint "$dir/ckpt" --source "http://127.0.0.1:$(sed -n 's/^PORT //p' "$dir/http1")" \
    --brokers "$brokers" --until-caught-up --http-listen off --debounce "$2" --json > "$1.jsonl"
  b=$(now)
  kill $s
  python3 -c "print(round($b - $a, 2))"
}
replay_s=$(replay "$dir/replay-store" 2)
replay0_s=$(replay "$dir/replay-store-0" 0)
replay0np_s=$(OSMVEC_CONTEXT_PRUNING=false replay "$dir/replay-store-0-np" 0)

python3 - "$dir" "$backlog_s" "$embedded" "$replay_s" "$replay0_s" "$tiles" "$replay0np_s" <<'PY'
import json, sys
d, backlog, embedded, replay, replay0, tiles, replay0np = sys.argv[1:]
f = json.load(open(f"{d}/freshness.json"))
fn = json.load(open(f"{d}/freshness-np.json"))
def tiles_of(path):
    return sum(json.loads(l)["tiles_embedded"] for l in open(path))
r2 = tiles_of(f"{d}/replay-store.jsonl"); r0 = tiles_of(f"{d}/replay-store-0.jsonl")
r0n = tiles_of(f"{d}/replay-store-0-np.jsonl")
print(f"""## Daemon freshness and replay (Maldives, 180 minutely diffs, {tiles} tiles)

| measure | value |
|---|---|
| import backlog: embed + publish every tile | {backlog} s for {embedded} tiles |
| freshness p50 / p90 / p99 / max (poll every {f['poll_interval_seconds']} s) | {f['p50_seconds']:.3f} / {f['p90_seconds']:.3f} / {f['p99_seconds']:.3f} / {f['max_seconds']:.3f} s |
| diffs with tiles / without | {f['with_tiles']} / {f['without_tiles']} ({f['tiles_embedded']} tile embeddings) |
| re-embedding everything per diff instead (backlog time / p50) | {float(backlog)/f['p50_seconds']:.0f}× slower |
| replay of the 180 minutes, debounce 2 s | {replay} s = {10800/float(replay):.0f}× real time ({r2} tile embeddings) |
| replay, debounce 0 (embed after every diff) | {replay0} s = {10800/float(replay0):.0f}× real time ({r0} tile embeddings) |

Context-dirty pruning (a dirty coarse tile re-embeds only the children whose context graph changed):

| measure | pruning on | pruning off |
|---|---|---|
| tile embeddings over the 180 diffs, one diff at a time | {f['tiles_embedded']} | {fn['tiles_embedded']} |
| per diff with tiles | {f['tiles_embedded']/max(f['with_tiles'],1):.1f} | {fn['tiles_embedded']/max(fn['with_tiles'],1):.1f} |
| freshness p50 / p99 | {f['p50_seconds']:.3f} / {f['p99_seconds']:.3f} s | {fn['p50_seconds']:.3f} / {fn['p99_seconds']:.3f} s |
| replay, debounce 0 | {replay0} s = {10800/float(replay0):.0f}× real time, {r0} tiles | {replay0np} s = {10800/float(replay0np):.0f}× real time, {r0n} tiles |
""")
PY
