#!/usr/bin/env bash
# Benchmarks embedding engine v2 against the reference forward pass, side by
# side in one run of one binary (figures go into docs/benchmarks.md by hand):
#
#   six       the store of the six latest extracts (Andorra, Port-au-Prince,
#             Helsinki, Liechtenstein, Malta, Monaco): embed --all with
#             --reference and with the engine (tiles/s, input / encoder
#             seconds, the largest cosine distance between the two runs'
#             vectors), and training steps/s at batch 256 both ways
#   maldives  the Maldives base (28,921 sparse tiles): embed --all both ways
#   synthetic COPIES x Maldives shifted across the globe (default 8: more
#             than 10,000 coarse tiles): embed --all both ways, peak RSS
#   backlog   one daemon cycle (512 tiles) with 10^4 and 10^6 dirty marks
#             waiting, and the full scan each cycle used to make
#   scale     COPIES x Malta (default 16; 64 is the planet-like one, ~19 M
#             objects, if disk and time allow): import rate, a real planet
#             minutely diff applied, a cycle with the whole import dirty;
#             the same on one Malta
#
# Usage: bash ops/bench-engine.sh [six] [maldives] [synthetic] [backlog] [scale]
#        (no argument: all of them)
# Environment: OSMVEC_DATA (default ../shared/data), OSMVEC_BIN (default
# target/release/osmvec), TMPDIR, COPIES_SYNTHETIC, COPIES_SCALE,
# TRAIN_STEPS (default 6).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
data=${OSMVEC_DATA:-$repo/../shared/data}
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
[ -x "$bin" ] || cargo build --release --locked -p osmvec
command -v jq >/dev/null || { s=; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get install -y -qq jq >/dev/null; }
bash ops/fetch-model.sh >/dev/null 2>&1
work=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-engine.XXXXXX")
trap 'rm -rf "$work"' EXIT
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(six maldives synthetic backlog scale)
want() { local s; for s in "${sections[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
E=$data/extracts
: "${TRAIN_STEPS:=6}"
now() { date +%s.%N; }
j() { jq -r "$1" "$2"; }
f1() { printf '%.1f' "$1"; }
f0() { printf '%.0f' "$1"; }
peak() { sed -n 's/^peak_kb //p' "$1"; }
timed() { # timed OUT_JSON RSS_FILE cmd...: JSON of the command, its peak RSS
  local out=$1 rss=$2; shift 2
  /usr/bin/time -f "peak_kb %M" -o "$rss" "$@" --json > "$out"
}
echo "osmvec bench-engine, $(date -u +%FT%TZ), $(nproc) cores, $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# embed --all both ways on STORE with CKPT; prints a table row per path.
embed_both() {
  local name=$1 store=$2 ckpt=$3 bs=${4:-256}
  timed "$work/$name-ref.json" "$work/$name-ref.rss" "$bin" embed --store "$store" --checkpoint "$ckpt" --all --batch-size "$bs" --reference
  timed "$work/$name-eng.json" "$work/$name-eng.rss" "$bin" embed --store "$store" --checkpoint "$ckpt" --all --batch-size "$bs"
  local r=$work/$name-ref.json e=$work/$name-eng.json
  local ratio
  ratio=$(echo "$(j .tiles_per_second "$e") / $(j .tiles_per_second "$r")" | bc -l)
  echo "| $name | reference | $(j .tiles "$r") | $(f0 "$(j .tiles_per_second "$r")") | $(f1 "$(j .input_seconds "$r")") | $(f1 "$(j .encode_seconds "$r")") | $(( $(peak "$work/$name-ref.rss") / 1024 )) | |"
  # The engine run re-embeds what the reference run wrote: its drift is the
  # cosine distance between the two paths' vectors, tile by tile.
  echo "| $name | engine v2 | $(j .tiles "$e") | $(f0 "$(j .tiles_per_second "$e")") | $(f1 "$(j .input_seconds "$e")") | $(f1 "$(j .encode_seconds "$e")") | $(( $(peak "$work/$name-eng.rss") / 1024 )) | **$(printf '%.1f' "$ratio")x**, max cosine distance to the reference $(j '.drift_max // 0' "$e") |"
}
header() {
  echo
  echo "| store | path | tiles | tiles/s | input s | encoder s | peak RSS MB | |"
  echo "|---|---|---|---|---|---|---|---|"
}

if want six || want backlog; then
  files=("$E/andorra-2021-04-14.osm.pbf" "$E/haiti-port-au-prince-2021-08-14.osm.pbf"
         "$E/helsinki-centre-2019-04-21.osm.pbf" "$E/liechtenstein-2022-07-24.osm.pbf"
         "$E/malta-2016-11-09.osm.pbf" "$E/monaco-2026-03-10.osm.pbf")
  "$bin" import --store "$work/six" "${files[@]}" > /dev/null
  "$bin" train --store "$work/six" --out "$work/six-ckpt" --steps 1 --batch-size 256 --save-every 0 > /dev/null
fi
if want six; then
  echo; echo "## embed --all, six latest extracts"
  header
  embed_both six "$work/six" "$work/six-ckpt"
  echo; echo "## training, batch 256, $TRAIN_STEPS steps from the same checkpoint"
  echo "| path | steps/s | s/step | inputs s | forward+backward+step s | last loss |"
  echo "|---|---|---|---|---|---|"
  for p in reference engine; do
    rm -rf "$work/tr-$p"; cp -r "$work/six-ckpt" "$work/tr-$p"
    flag=; [ $p = reference ] && flag=--reference
    "$bin" train --store "$work/six" --out "$work/tr-$p" --steps $((1 + TRAIN_STEPS)) --batch-size 256 --save-every 0 $flag --json > "$work/tr-$p.json"
    t=$work/tr-$p.json
    echo "| $p | $(printf '%.3f' "$(j .steps_per_second "$t")") | $(f1 "$(echo "1 / $(j .steps_per_second "$t")" | bc -l)") | $(f1 "$(j .input_seconds "$t")") | $(f1 "$(j .step_seconds_compute "$t")") | $(j .last_loss "$t") |"
  done
fi
if want maldives || want synthetic; then
  mal=$data/replication/maldives/base-2017-03-01T0749Z.osm.pbf
  "$bin" import --store "$work/mal" "$mal" > /dev/null
  "$bin" train --store "$work/mal" --out "$work/mal-ckpt" --steps 1 --batch-size 64 --save-every 0 > /dev/null
fi
if want maldives; then
  echo; echo "## embed --all, Maldives base"
  header
  embed_both maldives "$work/mal" "$work/mal-ckpt"
fi
if want synthetic; then
  n=${COPIES_SYNTHETIC:-8}
  python3 ops/synth-extract.py "$mal" "$n" "$work/synth.osm.pbf" 2>/dev/null
  "$bin" import --store "$work/synth" --json "$work/synth.osm.pbf" > "$work/synth-import.json"
  rm -f "$work/synth.osm.pbf"
  echo; echo "## embed --all, $n x Maldives: $(j .fine_tiles "$work/synth-import.json") fine tiles, $(j .coarse_tiles "$work/synth-import.json") coarse tiles"
  header
  embed_both synthetic "$work/synth" "$work/mal-ckpt"
  rm -rf "$work/synth"
fi
if want backlog; then
  echo; echo "## one daemon cycle (512 tiles) against the backlog, six-extract store"
  echo "| dirty marks waiting | cycle of 512 s (median of 3) | reading the cycle's marks s (largest) | full scan + sort of every mark s (each cycle before) |"
  echo "|---|---|---|---|"
  for filler in 10000 1000000; do
    rm -rf "$work/bk"; cp -r "$work/six" "$work/bk"
    "$bin" bench-cycle --store "$work/bk" --checkpoint "$work/six-ckpt" --mark-all --filler $filler --cycles 3 > "$work/bk-$filler.json"
    b=$work/bk-$filler.json
    echo "| $(j .marks "$b") | $(printf '%.2f' "$(j .median_cycle_seconds "$b")") | $(printf '%.4f' "$(j '.take_seconds | max' "$b")") | $(printf '%.2f' "$(j .full_scan_seconds "$b")") |"
  done
  rm -rf "$work/bk"
fi
if want scale; then
  n=${COPIES_SCALE:-16}
  malta=$E/malta-2016-11-09.osm.pbf
  diff=$data/diffs/planet-minute/004230996.osc.gz
  echo; echo "## scale: $n x Malta against one Malta"
  echo "| store | objects | import s | objects/s | store MB | planet minutely diff applied s | first cycle with the whole import dirty s |"
  echo "|---|---|---|---|---|---|---|"
  python3 ops/synth-extract.py "$malta" "$n" "$work/scale.osm.pbf" 2>/dev/null
  for name in one many; do
    src=$malta; [ $name = many ] && src=$work/scale.osm.pbf
    t0=$(now); "$bin" import --store "$work/s-$name" --json "$src" > "$work/s-$name.json"; t1=$(now)
    objs=$(j '.counts.nodes + .counts.ways + .counts.relations' "$work/s-$name.json")
    ta=$(now); "$bin" apply --store "$work/s-$name" "$diff" > /dev/null; tb=$(now)
    [ $name = one ] && "$bin" train --store "$work/s-one" --out "$work/s-ckpt" --steps 1 --batch-size 64 --save-every 0 > /dev/null
    "$bin" bench-cycle --store "$work/s-$name" --checkpoint "$work/s-ckpt" --cycles 1 > "$work/s-$name-cycle.json"
    mb=$(du -sm "$work/s-$name" | cut -f1)
    echo "| $([ $name = one ] && echo "Malta" || echo "$n x Malta") | $objs | $(f1 "$(echo "$t1 - $t0" | bc -l)") | $(f0 "$(echo "$objs / ($t1 - $t0)" | bc -l)") | $mb | $(printf '%.2f' "$(echo "$tb - $ta" | bc -l)") | $(printf '%.2f' "$(j '.cycle_seconds[0]' "$work/s-$name-cycle.json")") ($(j '.tiles_per_cycle[0]' "$work/s-$name-cycle.json") tiles of $(j .marks "$work/s-$name-cycle.json") marks) |"
    rm -rf "$work/s-$name"
  done
  rm -f "$work/scale.osm.pbf"
fi
