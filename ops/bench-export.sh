#!/usr/bin/env bash
# Benchmarks getting embeddings out, side by side with what a user did before
# (one tile or one point per HTTP request), in one run, on the Maldives store
# (base extract + the 180-minute feed, every tile embedded by a 1-step model).
# Prints a markdown table.
#
#   export-embeddings --all   geoparquet / parquet / npy: tiles/s, MB/s, peak RSS
#   GET /v1/tiles.parquet     the whole Maldives bbox, streamed
#   GET /v1/tiles/{z}/{x}/{y} one request per tile (keep-alive), the old way
#   embed-points              a 1,000,000-point grid: points/s
#   GET /v1/embed             one request per point (keep-alive), the old way
#
# Usage: bash ops/bench-export.sh    (OSMVEC_BIN, TMPDIR as in ops/bench.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
[ -x "$bin" ] || cargo build --release --locked -p osmvec
command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ] || bash ops/broker.sh install
export PATH="$HOME/.cargo/bin:$PATH"
work=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-export.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
export OSMVEC_LOG=warn
data=tests/data/replication/maldives
s=$work/store c=$work/ckpt
"$bin" import --store "$s" "$data/base-2017-03-01T0749Z.osm.pbf" > /dev/null
"$bin" train --store "$s" --out "$c" --steps 1 --batch-size 16 > /dev/null
"$bin" replicate --store "$s" --source "$data/minute" --until-caught-up > /dev/null
"$bin" embed --store "$s" --checkpoint "$c" --all > /dev/null

# Peak RSS (kB) of a command, from the kernel's rusage of the child.
peak() {
  python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"))
sys.exit(r.returncode) if r.returncode else print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)' "$@"
}
j() { python3 -c 'import json, sys; print(eval(sys.argv[2], {}, json.load(open(sys.argv[1]))))' "$@"; }

echo "| what | items | seconds | items/s | MB/s | peak RSS MB | vs the old way |"
echo "|---|---|---|---|---|---|---|"
for f in geoparquet parquet npy; do
  kb=$(peak "$work/r-$f.json" "$bin" export-embeddings --store "$s" --all --format $f -o "$work/all.$f" --json)
  echo "| export-embeddings --all --format $f | $(j "$work/r-$f.json" tiles) tiles | $(j "$work/r-$f.json" 'round(seconds, 2)') | $(j "$work/r-$f.json" 'round(tiles_per_second)') | $(j "$work/r-$f.json" 'round(megabytes_per_second, 1)') | $((kb / 1024)) | |"
done

# A daemon serving the store (caught up: it changes nothing).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
bport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && exec tansu broker --listener-url "tcp://127.0.0.1:$bport" --advertised-listener-url "tcp://127.0.0.1:$bport" \
  --storage-engine "memory://tansu/" --cluster-id osmvec-bench > "$work/tansu.log" 2>&1) &
pids+=($!)
"$bin" run --store "$s" --checkpoint "$c" --source "$data/minute" --brokers "127.0.0.1:$bport" \
  --http-listen "127.0.0.1:$port" --http-export-max-tiles 10000000 > /dev/null 2> "$work/run.log" &
pids+=($!)
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null 2>&1 && break; sleep 0.2; done
python3 - "$port" "$work" <<'EOF'
import http.client, json, sys, time
port, work = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", port)
def get(path):
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, (path, r.status, body[:200])
    return body
tiles = json.loads(get("/v1/tiles?limit=100000"))["tiles"]
t = time.perf_counter()
body = get("/v1/tiles.parquet?bbox=72.5,-1,74,7.5")
dt = time.perf_counter() - t
fast = len(tiles) / dt
print(f"| GET /v1/tiles.parquet, the Maldives bbox | {len(tiles)} tiles | {dt:.2f} | {fast:.0f} | {len(body) / 1e6 / dt:.1f} | | |")
n = min(3000, len(tiles))
t = time.perf_counter()
size = 0
for z, x, y, *_ in tiles[:n]:
    size += len(get(f"/v1/tiles/{z}/{x}/{y}"))
dt = time.perf_counter() - t
slow = n / dt
print(f"| GET /v1/tiles/z/x/y, one per tile (the way before; {n} of them) | {n} tiles | {dt:.2f} | {slow:.0f} | {size / 1e6 / dt:.1f} | | the export is **{fast / slow:.0f}×** |")
n = 2000
t = time.perf_counter()
for i in range(n):
    get(f"/v1/embed?lat={-0.7 + 7.8 * (i % 97) / 97}&lon={72.6 + 1.3 * (i % 89) / 89}")
dt = time.perf_counter() - t
json.dump({"per_s": n / dt}, open(f"{work}/embed-http.json", "w"))
EOF
kb=$(peak "$work/r-points.json" "$bin" embed-points --checkpoint "$c" --bbox 72.6,-0.7,73.9,7.1 --step-m 350 -o "$work/grid.parquet" --json)
pps=$(j "$work/r-points.json" 'round(points_per_second)')
http=$(j "$work/embed-http.json" 'round(per_s)')
echo "| embed-points, a 350 m grid over the Maldives | $(j "$work/r-points.json" points) points | $(j "$work/r-points.json" 'round(seconds, 2)') | $pps | $(j "$work/r-points.json" 'round(bytes / 1e6 / seconds, 1)') | $((kb / 1024)) | **$(python3 -c "print(round($pps / $http))")×** GET /v1/embed |"
echo "| GET /v1/embed, one per point (the way before; 2,000 of them) | 2000 points | | $http | | | |"
