#!/usr/bin/env bash
# The Python readers the test suite checks osmvec's outputs with — readers no
# one here wrote: pyarrow and geopandas open the exports, kafka-python and
# cbor2 consume the topics (tests/readers/, ops/plot-export.py).
#
#   bash ops/py-readers.sh        prints the virtualenv's python as the last line of stdout
#
# Creates, idempotently, a virtualenv at ${OSMVEC_PY_READERS:-~/.cache/osmvec/py-readers}
# (python3 -m venv; python3-venv from Debian when missing) and pip-installs the
# pinned wheels below (binary wheels only: nothing is compiled). A stamp file in
# the venv holds the requirement list it was built from: when it matches and the
# venv's python runs, nothing else is done (well under a second). Any other
# state (no venv, other pins, a broken interpreter) rebuilds the venv from
# scratch: 35-50 s on 2 cores, downloads included (about 600 MB installed,
# pyarrow most of it). Concurrent callers (parallel tests) wait on a lock
# instead of building twice. Only PyPI (pip) and Debian (apt-get) are used.
set -euo pipefail

# Every package, transitive dependencies included, pinned: the same versions on
# every machine. Change a pin here and the next run rebuilds the venv.
requirements='cbor2==6.3.0
certifi==2026.10.19.post1
contourpy==1.3.3
cycler==0.12.1
fonttools==4.68.0
geopandas==1.2.0
kafka-python==3.0.12
kiwisolver==1.5.1
matplotlib==3.11.2
numpy==2.4.6
packaging==26.4
pandas==3.1.1
pillow==13.0.0
pyarrow==26.0.1
pyogrio==0.13.0
pyparsing==3.3.3
pyproj==3.7.2
python-dateutil==4.0.0
shapely==2.2.0
tzdata==2026.6'

venv=${OSMVEC_PY_READERS:-$HOME/.cache/osmvec/py-readers}
mkdir -p "$(dirname "$venv")"
venv="$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")"
stamp="$venv/osmvec-requirements.txt"
py="$venv/bin/python"

ready() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirements" ] && "$py" -c '' 2>/dev/null
}

if ready; then
  echo "$py"
  exit 0
fi

# One builder at a time; whoever waited finds the venv ready.
exec 9>"$venv.lock"
flock 9
if ready; then
  echo "$py"
  exit 0
fi

# python3 and its venv module (Debian ships ensurepip in python3-venv).
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "ops/py-readers.sh: installing python3 python3-venv" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
# The pins have wheels for CPython 3.11 to 3.13 (Debian 12 and 13).
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "ops/py-readers.sh: $(python3 --version 2>&1) is too old; the pinned wheels need Python 3.11 or newer" >&2
  exit 1
fi

if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
  echo "ops/py-readers.sh: $venv exists and is not a virtualenv; not touching it" >&2
  exit 1
fi
echo "ops/py-readers.sh: creating $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
req_file="$venv/requirements.in"
printf '%s\n' "$requirements" > "$req_file"
"$py" -m pip install --quiet --no-input --disable-pip-version-check \
  --only-binary=:all: -r "$req_file" >&2

# Each reader imports and does a little real work before the venv counts as ready.
MPLBACKEND=Agg "$py" - >&2 <<'EOF'
import io
import cbor2, geopandas, kafka, matplotlib.pyplot as plt, numpy as np
import pyarrow as pa, pyarrow.parquet as pq, pyproj, shapely
assert pyproj.CRS("OGC:CRS84").equals(pyproj.CRS("EPSG:4326"), ignore_axis_order=True)
buf = io.BytesIO()
pq.write_table(pa.table({"v": np.arange(3, dtype=np.float32)}), buf)
assert pq.read_table(io.BytesIO(buf.getvalue()))["v"].to_pylist() == [0.0, 1.0, 2.0]
assert cbor2.loads(cbor2.dumps({"a": b"\x00"})) == {"a": b"\x00"}
assert shapely.box(0, 0, 1, 1).area == 1.0
plt.figure(figsize=(1, 1)).savefig(io.BytesIO(), format="png")
EOF

printf '%s' "$requirements" > "$stamp.tmp"
mv "$stamp.tmp" "$stamp"
echo "ops/py-readers.sh: ready ($(du -sh "$venv" | cut -f1))" >&2
echo "$py"
