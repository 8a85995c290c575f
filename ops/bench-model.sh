#!/usr/bin/env bash
# Benchmarks the model side on real data, in one run:
#   1. import the latest extract of every region in ../shared/data/extracts
#      into one store (Andorra, Port-au-Prince, Helsinki, Liechtenstein,
#      Malta, Monaco)
#   2. osmvec train: STEPS steps at batch BATCH (steps/s, samples/s); the
#      first run also encodes every tag text once (tag-cache warm-up, timed)
#   3. osmvec embed --all with a warm tag cache (tiles/s), twice
#   4. osmvec eval (retrieval and land-use probe against the baselines)
# and prints a markdown summary. Figures go into docs/model.md by hand.
#
# Usage: bash ops/bench-model.sh [--steps N] [--batch N] [--keep]
# Environment: OSMVEC_DATA (default ../shared/data), OSMVEC_BIN
# (default target/release/osmvec), TMPDIR, OSMVEC_DEVICE (cpu | cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
steps=20 batch=256 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
data=${OSMVEC_DATA:-$repo/../shared/data}
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
[ -x "$bin" ] || cargo build --release -p osmvec
command -v jq >/dev/null || { sudo -n true 2>/dev/null && s=sudo || s=; $s apt-get install -y jq >/dev/null; }
bash ops/fetch-model.sh >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-model.XXXXXX")
[ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
E=$data/extracts
files=("$E/andorra-2021-04-14.osm.pbf" "$E/haiti-port-au-prince-2021-08-14.osm.pbf"
       "$E/helsinki-centre-2019-04-21.osm.pbf" "$E/liechtenstein-2022-07-24.osm.pbf"
       "$E/malta-2016-11-09.osm.pbf" "$E/monaco-2026-03-10.osm.pbf")
now() { date +%s.%N; }
t0=$(now); "$bin" import --store "$work/store" --json "${files[@]}" > "$work/import.json"; t1=$(now)
"$bin" train --store "$work/store" --out "$work/ckpt" --steps 1 --batch-size "$batch" --json > "$work/warm.json"; t2=$(now)
"$bin" train --store "$work/store" --out "$work/ckpt" --steps $((steps + 1)) --batch-size "$batch" --save-every 0 --json > "$work/train.json"
"$bin" embed --store "$work/store" --checkpoint "$work/ckpt" --all --json > "$work/embed1.json"
"$bin" embed --store "$work/store" --checkpoint "$work/ckpt" --all --json > "$work/embed2.json"
"$bin" eval --store "$work/store" --checkpoint "$work/ckpt" --json > "$work/eval.json"
j() { jq -r "$1" "$2"; }
cat <<MD
| measure | value |
|---|---|
| store | $(j '.counts.point + .counts.polyline + .counts.polygon' "$work/import.json") features, $(j '.train_tiles' "$work/warm.json") training + $(j '.heldout_tiles' "$work/warm.json") test fine tiles |
| first training step incl. encoding $(j '.tag_texts_encoded' "$work/warm.json") tag texts | $(printf '%.1f' "$(echo "$t2 - $t1" | bc -l)") s |
| training, batch $batch, $steps steps | $(printf '%.3f' "$(j '.steps_per_second' "$work/train.json")") steps/s, $(printf '%.1f' "$(j '.samples_per_second' "$work/train.json")") samples/s |
| embed --all (warm tag cache), run 1 | $(printf '%.0f' "$(j '.tiles_per_second' "$work/embed1.json")") tiles/s ($(j '.tiles' "$work/embed1.json") tiles; inputs $(printf '%.1f' "$(j '.input_seconds' "$work/embed1.json")") s, encoder $(printf '%.1f' "$(j '.encode_seconds' "$work/embed1.json")") s) |
| embed --all (warm tag cache), run 2 | $(printf '%.0f' "$(j '.tiles_per_second' "$work/embed2.json")") tiles/s |
| eval (after $((steps + 1)) steps; intervals: \`bash ops/bench-eval.sh\`) | retrieval top-10 trained $(j '.retrieval.models.trained.top10.estimate' "$work/eval.json") / best baseline $(j '.retrieval.best_baseline' "$work/eval.json") $(j '.retrieval.models[.retrieval.best_baseline].top10.estimate' "$work/eval.json"); probe macro-F1 trained $(j '.land_use.models.trained.macro_f1.estimate' "$work/eval.json") / best baseline $(j '.land_use.best_baseline' "$work/eval.json") $(j '.land_use.models[.land_use.best_baseline].macro_f1.estimate' "$work/eval.json") |
MD
echo "import $(printf '%.1f' "$(echo "$t1 - $t0" | bc -l)") s; work dir $work" >&2
