#!/usr/bin/env bash
# The evaluation a skeptic accepts, in one run (issue 15):
#   1. one store of the latest extract of every region in ../shared/data
#      (or --store DIR, reused as it is)
#   2. land/sea labels from outside OSM for the store's grid of fine tiles
#      (osmvec label-points | ops/external-labels.sh: GLOBE via
#      global-land-mask)
#   3. the default model (per-tag texts, L = 10) trained in stages up to
#      --steps, `osmvec eval` after every --every steps: the learning curve
#   4. the same budget for three variants, evaluated once at the end:
#      L = 40, OSMGraphCLIP's one-label-per-feature tag texts, and SatCLIP's
#      SIREN dropout 0.5
# and prints one markdown table: every model's estimate with its 95 %
# block-bootstrap interval, the best baseline, and the paired interval of
# trained − best baseline. Figures go into docs/model.md by hand.
#
# Usage: bash ops/bench-eval.sh [--steps N] [--every N] [--batch N]
#                               [--store DIR] [--variants "l40 label dropout"] [--keep]
# Environment: OSMVEC_DATA (default ../shared/data), OSMVEC_BIN (default
# target/release/osmvec), TMPDIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
steps=300 every=50 batch=256 store= keep=0 variants="l40 label dropout"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    --variants) variants=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
data=${OSMVEC_DATA:-$repo/../shared/data}
bin=${OSMVEC_BIN:-$repo/target/release/osmvec}
[ -x "$bin" ] || cargo build --release --locked -p osmvec
command -v jq >/dev/null || { sudo -n true 2>/dev/null && s=sudo || s=; $s apt-get install -y jq >/dev/null; }
bash ops/fetch-model.sh >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/osmvec-bench-eval.XXXXXX")
[ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
if [ -z "$store" ]; then
  store=$work/store
  E=$data/extracts
  "$bin" import --store "$store" --json "$E/andorra-2021-04-14.osm.pbf" \
    "$E/haiti-port-au-prince-2021-08-14.osm.pbf" "$E/helsinki-centre-2019-04-21.osm.pbf" \
    "$E/liechtenstein-2022-07-24.osm.pbf" "$E/malta-2016-11-09.osm.pbf" \
    "$E/monaco-2026-03-10.osm.pbf" > "$work/import.json"
fi
"$bin" label-points --store "$store" > "$work/points.csv"
bash ops/external-labels.sh < "$work/points.csv" > "$work/labels.csv"

evaluate() { # checkpoint → eval json
  "$bin" eval --store "$store" --checkpoint "$1" --external-labels "$work/labels.csv" \
    --json > "$2" 2> "$2.log"
}
row() { # name json
  jq -r --arg name "$1" '
    def i(x): "\(x.estimate * 1000 | round / 1000) [\(x.low * 1000 | round / 1000), \(x.high * 1000 | round / 1000)]";
    def task(t; m): if t == null then "—" else
      "\(i(t.models.trained[m])) · best baseline \(t.best_baseline) \(i(t.models[t.best_baseline][m])) · diff \(i(if m == "top10" then t.trained_minus_baseline_top10[t.best_baseline] else t.trained_minus_baseline_macro_f1[t.best_baseline] end))" end;
    "| \($name) | \(.training_steps) | \(task(.retrieval; "top10")) | \(task(.land_use; "macro_f1")) | \(task(.external; "macro_f1")) |"
  ' "$2"
}

train() { # out steps extra-args...
  local out=$1 n=$2; shift 2
  "$bin" train --store "$store" --out "$out" --steps "$n" --batch-size "$batch" --seed 42 \
    --save-every 0 --json "$@" > "$out.train-$n.json" 2> "$out.train-$n.log"
}

rows=()
t0=$(date +%s)
for ((n = every; n <= steps; n += every)); do
  train "$work/default" "$n"
  evaluate "$work/default" "$work/default-$n.json"
  rows+=("$(row "default (per-tag, L = 10)" "$work/default-$n.json")")
  echo "default: $n steps evaluated ($(( $(date +%s) - t0 )) s)" >&2
done
for v in $variants; do
  case "$v" in
    l40) train "$work/$v" "$steps" --degree 40; name="L = 40" ;;
    label) train "$work/$v" "$steps" --tag-texts feature-label; name="feature label (OSMGraphCLIP)" ;;
    dropout) train "$work/$v" "$steps" --dropout 0.5; name="SIREN dropout 0.5 (SatCLIP)" ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  evaluate "$work/$v" "$work/$v.json"
  rows+=("$(row "$name" "$work/$v.json")")
  echo "$v: evaluated ($(( $(date +%s) - t0 )) s)" >&2
done

last=$work/default-$steps.json
[ -f "$last" ] || last=$(ls "$work"/default-*.json | sort -t- -k2 -n | tail -1)
cat <<MD
Split: $(jq -r '.split | "\(.train_tiles) training, \(.guard_tiles) guard, \(.validation_tiles) validation, \(.test_tiles) test tiles (\(.test_blocks) test blocks); of \(.test_features) features in test tiles \(.test_features_in_training_tiles) are also in training tiles (\(.test_features_in_training_or_guard_tiles) without the guard band)"' "$last").
Bootstrap: $(jq -r '.bootstrap | "\(.resamples) resamples of whole test blocks, \(.confidence * 100) % percentile intervals"' "$last").
Retrieval: $(jq -r '.retrieval | "\(.queries) test queries (chance top-10 \(.chance_top10 * 1000 | round / 1000))"' "$last"); land use: $(jq -r '.land_use | "\(.test_counts | add) labelled test tiles"' "$last"); external: $(jq -r '.external | "\(.test_counts | add) test points (\(.classes | join("/")) \(.test_counts | map(tostring) | join("/")))"' "$last").

| model | steps | retrieval top-10 | land-use macro-F1 | land/sea macro-F1 (GLOBE) |
|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

All baselines of the last default run:

$(jq -r '
  def i(x): "\(x.estimate * 1000 | round / 1000) [\(x.low * 1000 | round / 1000), \(x.high * 1000 | round / 1000)]";
  "| model | retrieval top-1 | retrieval top-10 | land-use accuracy | land-use macro-F1 | land/sea accuracy | land/sea macro-F1 |",
  "|---|---|---|---|---|---|---|",
  ((.retrieval.models | keys[]) as $m
  | "| \($m) | \(i(.retrieval.models[$m].top1)) | \(i(.retrieval.models[$m].top10)) | \(if .land_use then i(.land_use.models[$m].accuracy) else "—" end) | \(if .land_use then i(.land_use.models[$m].macro_f1) else "—" end) | \(if .external then i(.external.models[$m].accuracy) else "—" end) | \(if .external then i(.external.models[$m].macro_f1) else "—" end) |"),
  "| majority | | | \(i(.land_use.models.majority.accuracy)) | \(i(.land_use.models.majority.macro_f1)) | \(if .external then i(.external.models.majority.accuracy) else "—" end) | \(if .external then i(.external.models.majority.macro_f1) else "—" end) |"
' "$last")
MD
echo "work dir $work ($(( $(date +%s) - t0 )) s)" >&2
