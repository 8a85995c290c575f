#!/usr/bin/env python3
"""A synthetic extract made of many copies of a real one, for scale benchmarks.

Copy k of the input keeps every object, tag and reference, with ids moved by
k * ID_STRIDE (so copies never collide) and coordinates moved across the
globe: copies sit on a grid of COLUMNS longitudes times rows of latitudes
between about -55 and +60 degrees, each cell wider and taller than the
extract, so no two copies share a tile. The result is real OSM structure at
a size no bundled extract has (e.g. 64 x Malta: about 19 million objects).

Uses osmium-tool (OPL in, PBF out; ops/install.sh installs it).

  python3 ops/synth-extract.py IN.osm.pbf COPIES OUT.osm.pbf
"""
import math
import os
import subprocess
import sys
import tempfile

ID_STRIDE = 10_000_000_000


def bbox(opl_path):
    """The box holding 99.8 % of the nodes (a few strays far away, such as a
    relation's members outside the extract, would make every copy huge;
    those few may share tiles with a neighbouring copy, which changes
    nothing a benchmark measures)."""
    xs, ys = [], []
    with open(opl_path) as f:
        for line in f:
            if line[0] != "n":
                continue
            x = y = None
            for tok in line.split(" "):
                if tok.startswith("x"):
                    x = tok[1:]
                elif tok.startswith("y"):
                    y = tok[1:].rstrip("\n")
            if x and y:
                xs.append(float(x))
                ys.append(float(y))
    xs.sort()
    ys.sort()
    lo = len(xs) // 1000
    hi = len(xs) - 1 - lo
    return xs[lo], ys[lo], xs[hi], ys[hi]


def shift_refs(value, offset):
    # "n12,n34" or "n12@role,w5@" (relation members): the id after the type.
    out = []
    for item in value.split(","):
        if not item:
            continue
        t = item[0]
        rest = item[1:]
        if "@" in rest:
            num, role = rest.split("@", 1)
            out.append(f"{t}{int(num) + offset}@{role}")
        else:
            out.append(f"{t}{int(rest) + offset}")
    return ",".join(out)


def main():
    src, copies, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with tempfile.TemporaryDirectory() as tmp:
        opl = os.path.join(tmp, "in.opl")
        subprocess.run(["osmium", "cat", "-f", "opl", "-o", opl, "--overwrite", src], check=True)
        lon0, lat0, lon1, lat1 = bbox(opl)
        w = max(lon1 - lon0, 0.01) * 1.5
        h = max(lat1 - lat0, 0.01) * 1.5
        cols = max(1, int(340 // w))
        rows = max(1, int(115 // h))
        if copies > cols * rows:
            sys.exit(f"{copies} copies of a {w:.2f} x {h:.2f} degree extract do not fit on the globe")
        out = os.path.join(tmp, "out.opl")
        # osmium wants objects sorted by type then id: write all copies'
        # nodes first, then ways, then relations (ids grow with the copy).
        with open(out, "w") as o:
            for kind in "nwr":
                for k in range(copies):
                    dx = -170 - lon0 + (k % cols) * w
                    dy = -55 - lat0 + (k // cols) * h
                    off = k * ID_STRIDE
                    with open(opl) as f:
                        for line in f:
                            if line[0] != kind:
                                continue
                            toks = line.rstrip("\n").split(" ")
                            toks[0] = kind + str(int(toks[0][1:]) + off)
                            for i, tok in enumerate(toks):
                                c = tok[:1]
                                if kind == "n" and c == "x" and len(tok) > 1:
                                    # Strays outside the box wrap around.
                                    x = (float(tok[1:]) + dx + 180.0) % 360.0 - 180.0
                                    toks[i] = "x%.7f" % x
                                elif kind == "n" and c == "y" and len(tok) > 1:
                                    y = min(max(float(tok[1:]) + dy, -85.0), 85.0)
                                    toks[i] = "y%.7f" % y
                                elif kind in "wr" and c in "NM" and len(tok) > 1:
                                    toks[i] = c + shift_refs(tok[1:], off)
                            o.write(" ".join(toks) + "\n")
        subprocess.run(["osmium", "cat", "-o", dst, "--overwrite", out], check=True)
    print(f"{copies} copies of {src} ({w:.2f} x {h:.2f} degrees each) -> {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
