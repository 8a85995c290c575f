#!/usr/bin/env bash
# The GPU check, in two halves so that a lent GPU's minutes go to measuring:
#
#   bash ops/gpu-check.sh --prepare   (here, no GPU needed)
#       builds the CUDA binary (ops/build-cuda.sh), imports the Monaco 2026
#       extract and warms its tag-vector cache (so the GPU machine needs no
#       text model), and packs both into .gpu/ (git-ignored, ~20 MB; carry it)
#   bash ops/gpu-check.sh             (on the machine with the GPU)
#       1. trains a 1-step checkpoint on the CPU (seeded: reproducible);
#       2. embeds every tile on the CPU and on the GPU with that checkpoint,
#          engine v2 both, and the reference path on the GPU;
#       3. checks the GPU vectors agree with the CPU's within 1e-4 (largest
#          component difference) and prints tiles/s for each run;
#       4. times training steps at batch 256 on the GPU (engine and
#          reference) and on the CPU;
#       everything as JSON lines in $OUT (or .gpu/out) and a summary on stdout.
#       Exit status 1 when the vectors disagree.
#
# With the `device` tool: run(command="bash ops/gpu-check.sh", carry=[".gpu"],
# timeout_s=540) after `bash ops/gpu-check.sh --prepare` here.
set -euo pipefail
cd "$(dirname "$0")/.."
g=.gpu
if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  bash ops/build-cuda.sh
  cargo build --release --locked -p osmvec
  rm -rf "$g" && mkdir -p "$g"
  bin=target/release/osmvec
  "$bin" import --store "$g/store" tests/data/extracts/monaco-2026-03-10.osm.pbf > /dev/null
  # One CPU training step encodes every tag text into the store's cache.
  "$bin" train --store "$g/store" --out "$g/warm-ckpt" --steps 1 --batch-size 16 --save-every 0 > /dev/null
  rm -rf "$g/warm-ckpt"
  strip -o "$g/osmvec" target/cuda/release/osmvec
  xz -T2 -6 "$g/osmvec"
  tar -C "$g" -cJf "$g/store.tar.xz" store && rm -rf "$g/store"
  du -sh "$g"/*
  echo "prepared $g: carry it to the GPU machine and run: bash ops/gpu-check.sh" >&2
  exit 0
fi

out=${OUT:-$g/out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
xz -dc "$g/osmvec.xz" > "$work/osmvec" && chmod +x "$work/osmvec"
tar -C "$work" -xJf "$g/store.tar.xz"
bin=$work/osmvec
# cuBLAS, cuRAND, NVRTC of the machine's CUDA 13 (its Python packages or a
# toolkit); the driver's libcuda comes with the driver.
for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null) \
         /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}
done
ldd "$bin" | grep -E "cublas|curand|nvrtc|cuda" | tee "$out/ldd.txt"
export OSMVEC_LOG=warn
s=$work/store
"$bin" train --store "$s" --out "$work/ckpt" --steps 1 --batch-size 64 --save-every 0 > /dev/null
run_embed() { # name device extra...
  local name=$1 dev=$2; shift 2
  rm -rf "$work/$name"; cp -r "$s" "$work/$name"
  "$bin" embed --store "$work/$name" --checkpoint "$work/ckpt" --all --batch-size 256 --device "$dev" "$@" --json > "$out/embed-$name.json"
}
run_embed cpu cpu
run_embed cuda cuda
run_embed cuda-ref cuda --reference
"$bin" compare-embeddings "$work/cpu" "$work/cuda" > "$out/compare.json"
"$bin" compare-embeddings "$work/cpu" "$work/cuda-ref" > "$out/compare-ref.json"
train_rate() { # name device extra...
  local name=$1 dev=$2; shift 2
  rm -rf "$work/t-$name"; cp -r "$work/ckpt" "$work/t-$name"
  "$bin" train --store "$s" --out "$work/t-$name" --steps 6 --batch-size 256 --save-every 0 --device "$dev" "$@" --json > "$out/train-$name.json"
}
train_rate cuda cuda
train_rate cuda-ref cuda --reference
train_rate cpu cpu
python3 - "$out" <<'PY'
import json, sys
o = sys.argv[1]
r = lambda n: json.load(open(f"{o}/{n}.json"))
c, cr = r("compare"), r("compare-ref")
print(f"GPU: {open(o + '/gpu.txt').read().strip()}")
for n in ["cpu", "cuda", "cuda-ref"]:
    e = r(f"embed-{n}")
    print(f"embed --all {n:9}: {e['tiles']} tiles, {e['tiles_per_second']:.0f} tiles/s (inputs {e['input_seconds']:.1f} s, encoder {e['encode_seconds']:.1f} s)")
print(f"GPU vs CPU (engine): {c['compared']} tiles, max |difference| {c['max_abs_difference']:.2e}, max cosine distance {c['max_cosine_distance']:.2e}")
print(f"GPU reference vs CPU engine: max |difference| {cr['max_abs_difference']:.2e}")
for n in ["cuda", "cuda-ref", "cpu"]:
    t = r(f"train-{n}")
    print(f"train batch 256 {n:9}: {t['steps_per_second']:.3f} steps/s ({t['steps_this_run']} steps)")
ok = c["compared"] > 0 and c["only_in_a"] == 0 and c["only_in_b"] == 0 and c["max_abs_difference"] < 1e-4
print("AGREE within 1e-4" if ok else "DISAGREE")
sys.exit(0 if ok else 1)
PY
