#!/usr/bin/env bash
# The main job on bundled real data, end to end:
#   1. import the Maldives base extract (2017-03-01 07:49Z);
#   2. train a small model on it (a few CPU minutes; kept in target/demo/ckpt and
#      reused on the next run);
#   3. start the local Kafka-protocol broker (tansu, ops/broker.sh) on
#      127.0.0.1:${OSMVEC_DEMO_BROKER_PORT:-19092};
#   4. serve the bundled 180-minute Maldives minutely feed over HTTP on
#      127.0.0.1 and run the daemon over it until caught up: every diff
#      applied, every dirty tile embedded, every change and embedding
#      published; one JSON line per cycle (tiles, latency, drift);
#   5. print the store's statistics and what the topics hold.
# The store (target/demo/store), the checkpoint (target/demo/ckpt) and the broker are left
# for you to inspect; `bash ops/broker.sh stop` stops the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install.sh
bash ops/broker.sh install
bin=target/release/osmvec
store=${OSMVEC_DEMO_STORE:-target/demo/store}
ckpt=${OSMVEC_DEMO_CKPT:-target/demo/ckpt}
port=${OSMVEC_DEMO_BROKER_PORT:-19092}
data=tests/data/replication/maldives
rm -rf "$store"
mkdir -p "$(dirname "$store")" "$(dirname "$ckpt")"

"$bin" import --store "$store" "$data/base-2017-03-01T0749Z.osm.pbf"
if [ ! -f "$ckpt/checkpoint.json" ]; then
  "$bin" train --store "$store" --out "$ckpt" --steps 30 --batch-size 64
fi

bash ops/broker.sh stop >/dev/null 2>&1 || true
bash ops/broker.sh start "$port"

python3 tests/fixtures/http_source.py --dir "$data/minute" --port 0 > /tmp/osmvec-demo-http.$$ &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f /tmp/osmvec-demo-http.$$' EXIT
for _ in $(seq 50); do grep -q '^PORT ' /tmp/osmvec-demo-http.$$ 2>/dev/null && break; sleep 0.1; done
http=$(sed -n 's/^PORT //p' /tmp/osmvec-demo-http.$$)
echo "replication source: http://127.0.0.1:$http (bundled Maldives minutely feed)" >&2

"$bin" run --store "$store" --source "http://127.0.0.1:$http" --checkpoint "$ckpt" \
  --brokers "127.0.0.1:$port" --until-caught-up --json
"$bin" stats --store "$store"
for topic in osmvec.models osmvec.changes osmvec.tile-embeddings; do
  echo "== $topic" >&2
  cargo run -q --release --locked -p osmvec --example consume -- "127.0.0.1:$port" "$topic" 3 | tail -n 3
done
echo "broker left running on 127.0.0.1:$port (bash ops/broker.sh stop)" >&2
echo "to watch the drift page and /metrics, run the daemon on in the foreground:" >&2
echo "  $bin run --store $store --checkpoint $ckpt --source $data/minute --brokers 127.0.0.1:$port" >&2
echo "  then open http://127.0.0.1:9187/ (docs/observability.md)" >&2
