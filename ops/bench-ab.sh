#!/usr/bin/env bash
# Two osmvec binaries side by side on the same inputs, runs alternating (so a
# busy neighbour on a shared machine slows both alike): import of Malta into
# a fresh store, the Liechtenstein 2013 -> 2022 diff applied to a copy of the
# 2013 store, and `embed --all` on the store of the six latest extracts with
# one 1-step checkpoint (tiles/s, input and encoder seconds, and the largest
# cosine distance of each run's vectors to the ones stored before it: equal
# vectors show as rounding, ~1e-16). Prints one line per run; the figures go
# into docs/benchmarks.md by hand. For checking that a refactor or a
# speed-up changes what it should and nothing else.
#
# Usage: bash ops/bench-ab.sh OLD_BINARY NEW_BINARY [RUNS]   (RUNS default 3)
#   e.g. git worktree add /tmp/old HEAD~1 && (cd /tmp/old && cargo build --release -p osmvec)
#        bash ops/bench-ab.sh /tmp/old/target/release/osmvec target/release/osmvec
# Environment: OSMVEC_DATA (default ../shared/data), TMPDIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2"); runs=${3:-3}
data=${OSMVEC_DATA:-$repo/../shared/data}
E=$data/extracts; D=$data/diffs/derived
command -v jq >/dev/null || { s=; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get install -y -qq jq >/dev/null; }
bash "$repo/ops/fetch-model.sh" >/dev/null 2>&1
w=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-ab.XXXXXX")
trap 'rm -rf "$w"' EXIT
secs() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
echo "A = $A ($("$A" --version))"
echo "B = $B ($("$B" --version))"
echo "== import Malta 2016-11-09 into a fresh store, s"
for _ in $(seq "$runs"); do for b in A B; do
  rm -rf "$w/m"; echo "$b $(secs "${!b}" import --store "$w/m" "$E/malta-2016-11-09.osm.pbf")"
done; done
echo "== apply the Liechtenstein 2013-08-03 -> 2022-07-24 diff to a copy of the 2013 store, s"
"$B" import --store "$w/li" "$E/liechtenstein-2013-08-03.osm.pbf" >/dev/null 2>&1
for _ in $(seq "$runs"); do for b in A B; do
  rm -rf "$w/lc"; cp -r "$w/li" "$w/lc"
  echo "$b $(secs "${!b}" apply --store "$w/lc" "$D/liechtenstein-2013-08-03_2022-07-24.osc.gz")"
done; done
echo "== embed --all, six latest extracts, batch 256"
"$B" import --store "$w/six" "$E/andorra-2021-04-14.osm.pbf" "$E/haiti-port-au-prince-2021-08-14.osm.pbf" \
  "$E/helsinki-centre-2019-04-21.osm.pbf" "$E/liechtenstein-2022-07-24.osm.pbf" \
  "$E/malta-2016-11-09.osm.pbf" "$E/monaco-2026-03-10.osm.pbf" >/dev/null 2>&1
"$B" train --store "$w/six" --out "$w/ck" --steps 1 --batch-size 256 --save-every 0 >/dev/null 2>&1
# A first run encodes and caches the tag texts, so that no timed run does.
"$B" embed --store "$w/six" --checkpoint "$w/ck" --all --batch-size 256 >/dev/null 2>&1
for _ in $(seq "$runs"); do for b in A B; do
  echo "$b $("${!b}" embed --store "$w/six" --checkpoint "$w/ck" --all --batch-size 256 --json 2>/dev/null |
    jq -c '{tiles, tiles_per_second, input_seconds, encode_seconds, drift_max}')"
done; done
