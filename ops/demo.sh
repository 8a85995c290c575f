#!/usr/bin/env bash
# The main job on bundled real data: import the Maldives base extract, then
# follow the bundled 180-minute replication feed served over HTTP on
# 127.0.0.1 (a real HTTP source), and print the store's statistics.
# The store is left in ./demo-store for you to inspect
# (`target/release/osmvec stats --store demo-store`, `... export --store demo-store`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install.sh
bin=target/release/osmvec
store=${OSMVEC_DEMO_STORE:-demo-store}
rm -rf "$store"
data=tests/data/replication/maldives

"$bin" import --store "$store" "$data/base-2017-03-01T0749Z.osm.pbf"

python3 tests/fixtures/http_source.py --dir "$data/minute" --port 0 > /tmp/osmvec-demo-http.$$ &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f /tmp/osmvec-demo-http.$$' EXIT
for _ in $(seq 50); do grep -q '^PORT ' /tmp/osmvec-demo-http.$$ 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/^PORT //p' /tmp/osmvec-demo-http.$$)
echo "replication source: http://127.0.0.1:$port (bundled Maldives minutely feed)" >&2

"$bin" replicate --store "$store" --source "http://127.0.0.1:$port" --until-caught-up
"$bin" stats --store "$store"
