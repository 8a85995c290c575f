#!/usr/bin/env python3
"""Open osmvec's exports with readers no one here wrote, and check them.

    check_export.py FILE EXPECTED_JSON [--format geoparquet|parquet|npy]
    check_export.py --points FILE [EMBED_JSON] [--expect-rows N] [--input POINTS]
                    [--expect-model-version V] [--dim D] [--allow-non-unit] [--atol A]

Tile exports (`osmvec export-embeddings`). EXPECTED_JSON is a JSON list of
the daemon's `GET /v1/tiles/{z}/{x}/{y}` answers ({tile, z, x, y,
model_version, sequence, computed_at, drift, dim, vector}): what the store
holds, as the daemon serves it. The export must hold exactly those tiles,
each with the same vector bit for bit (as float32), model version, sequence,
drift and time.

* geoparquet (default), read with pyarrow.parquet: every column with its
  Arrow type; the `geo` metadata as GeoParquet 1.1.0 says (version, primary
  column, WKB, Polygon, a CRS that pyproj finds equal to EPSG:4326 up to axis
  order, a file bbox equal to the union of the rows' geometries, the `bbox`
  covering, each row's bbox the bounds of its counter-clockwise polygon);
  the `osmvec` metadata (dim, model_versions, store_sequence, zoom; tiles
  and the requested bbox when present); tile == z/x/y, the quadkey, rows in
  tile order (z, x, y). Then read with geopandas.read_parquet: the active
  geometry column, its CRS, each polygon equal to the Web Mercator bounds of
  its z/x/y (computed here from the tile numbers, within 1e-9 degrees), and
  a bbox read (geopandas filters rows on the covering column) finding one
  tile.
* parquet: the same columns without geometry and bbox, no `geo` metadata.
* npy: FILE is a float32 [N, dim] .npy (numpy.load), FILE + ".tiles.csv"
  lists [row,]tile,z,x,y,model_version,sequence,computed_at,drift in the
  same order (row: the 0-based .npy row, docs/export.md).

Point embeddings (`osmvec embed-points`, `--points`): columns id (only when
the input had one), lon, lat (double) and embedding
(fixed_size_list<float32>[dim]); `osmvec` metadata with model_version and
dim; every vector finite and of unit length (`--allow-non-unit`: finite is
enough); `--expect-rows` rows; with `--input`, the ids and coordinates of the
input in the input's order; with EMBED_JSON (a JSON list of `GET
/v1/embed` answers, each with the point's `id` added when the input has
ids), the vector of each listed point (found by id, else by lon/lat) within
`--atol` of the daemon's: the same encoder, but computed in batches, so not
necessarily bit for bit.

Exit 0 with one JSON summary line on stdout; on a violation, what and which
tile (or row) on stderr, exit 1. Only the standard library and the packages
ops/py-readers.sh installs.
"""

import argparse
import csv
import datetime as dt
import json
import math
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOL = 1e-9  # degrees, for every coordinate comparison
MAX_REPORTED = 20
RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
UTC_ZONES = {"UTC", "+00:00", "Etc/UTC", "Z"}
CSV_HEADER = ["tile", "z", "x", "y", "model_version", "sequence", "computed_at", "drift"]
# docs/export.md puts the row number (0-based, the .npy row) first.
CSV_HEADER_ROW = ["row"] + CSV_HEADER


class Failed(Exception):
    """A violation that makes further checks pointless."""


class Report:
    """Collects violations; the first MAX_REPORTED are printed."""

    def __init__(self):
        self.errors = []

    def fail(self, msg):
        self.errors.append(msg)

    def check(self, ok, msg):
        if not ok:
            self.fail(msg)
        return ok

    def stop_if_failed(self):
        if self.errors:
            raise Failed()

    def finish(self, summary):
        if self.errors:
            for e in self.errors[:MAX_REPORTED]:
                print(f"check_export: {e}", file=sys.stderr)
            if len(self.errors) > MAX_REPORTED:
                print(f"check_export: ... and {len(self.errors) - MAX_REPORTED} more", file=sys.stderr)
            print(f"check_export: FAILED ({len(self.errors)} violations)", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(summary, sort_keys=True))


# --- Tiles, computed here from the tile numbers alone -------------------------

def tile_bounds(z, x, y):
    """(west, south, east, north) in degrees of the Web Mercator tile z/x/y."""
    n = 2.0 ** z

    def lon(xx):
        return xx / n * 360.0 - 180.0

    def lat(yy):
        return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * yy / n))))

    return (lon(x), lat(y + 1), lon(x + 1), lat(y))


def quadkey(z, x, y):
    digits = []
    for i in range(z, 0, -1):
        mask = 1 << (i - 1)
        digits.append(str((1 if x & mask else 0) + (2 if y & mask else 0)))
    return "".join(digits)


def close(a, b, tol=TOL):
    return abs(a - b) <= tol


def parse_rfc3339(s):
    """An aware datetime, or None when `s` is not RFC 3339."""
    if not isinstance(s, str) or not RFC3339.match(s):
        return None
    return dt.datetime.fromisoformat(s.replace("z", "Z").replace("t", "T"))


def rfc3339(t):
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


# --- What the daemon serves -----------------------------------------------------

def load_expected(path, rep):
    """{tile: answer} from a JSON list of /v1/tiles/{z}/{x}/{y} answers."""
    with open(path) as f:
        answers = json.load(f)
    if not isinstance(answers, list):
        rep.fail(f"{path}: expected a JSON list of /v1/tiles answers, got {type(answers).__name__}")
        raise Failed()
    out = {}
    for i, a in enumerate(answers):
        where = f"{path}[{i}]"
        missing = [k for k in ("tile", "z", "x", "y", "model_version", "sequence",
                               "computed_at", "drift", "dim", "vector") if k not in a]
        if missing:
            rep.fail(f"{where}: answer lacks {missing}")
            continue
        tile = a["tile"]
        if tile != f"{a['z']}/{a['x']}/{a['y']}":
            rep.fail(f"{where}: tile {tile!r} but z/x/y {a['z']}/{a['x']}/{a['y']}")
        if tile in out:
            rep.fail(f"{where}: tile {tile} listed twice")
        if len(a["vector"]) != a["dim"]:
            rep.fail(f"{where} ({tile}): {len(a['vector'])} floats but dim {a['dim']}")
        if parse_rfc3339(a["computed_at"]) is None:
            rep.fail(f"{where} ({tile}): computed_at {a['computed_at']!r} is not RFC 3339")
        out[tile] = a
    rep.stop_if_failed()
    return out


def compare_rows(rows, expected, rep):
    """rows: list of dicts (tile, z, x, y, model_version, sequence, computed_at
    as aware datetime, drift as float32 or None, embedding as float32 array)."""
    seen = {}
    for i, r in enumerate(rows):
        if r["tile"] in seen:
            rep.fail(f"tile {r['tile']}: exported twice (rows {seen[r['tile']]} and {i})")
        seen[r["tile"]] = i
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    if missing:
        rep.fail(f"{len(missing)} expected tiles missing from the export, e.g. {missing[:5]}")
    if extra:
        rep.fail(f"{len(extra)} exported tiles the daemon does not serve, e.g. {extra[:5]}")
    for r in rows:
        tile = r["tile"]
        e = expected.get(tile)
        if e is None:
            continue
        if (r["z"], r["x"], r["y"]) != (e["z"], e["x"], e["y"]):
            rep.fail(f"tile {tile}: z/x/y {r['z']}/{r['x']}/{r['y']}, the daemon says {e['z']}/{e['x']}/{e['y']}")
        want = np.asarray(e["vector"], dtype=np.float32)
        got = r["embedding"]
        if got.shape != want.shape:
            rep.fail(f"tile {tile}: embedding of {got.shape[0]} floats, the daemon serves {want.shape[0]}")
        elif not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            k = int(np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))[0])
            n = int((got.view(np.uint32) != want.view(np.uint32)).sum())
            rep.fail(f"tile {tile}: embedding differs in {n} of {want.shape[0]} components, "
                     f"first [{k}]: {got[k]!s} vs served {want[k]!s}")
        if r["model_version"] != e["model_version"]:
            rep.fail(f"tile {tile}: model_version {r['model_version']!r}, served {e['model_version']!r}")
        if r["sequence"] != e["sequence"]:
            rep.fail(f"tile {tile}: sequence {r['sequence']}, served {e['sequence']}")
        if e["drift"] is None or r["drift"] is None:
            if (e["drift"] is None) != (r["drift"] is None):
                rep.fail(f"tile {tile}: drift {r['drift']}, served {e['drift']}")
        elif np.float32(r["drift"]).view(np.uint32) != np.float32(e["drift"]).view(np.uint32):
            rep.fail(f"tile {tile}: drift {np.float32(r['drift'])!s}, served {np.float32(e['drift'])!s}")
        want_t = parse_rfc3339(e["computed_at"])
        if r["computed_at"] != want_t:
            rep.fail(f"tile {tile}: computed_at {rfc3339(r['computed_at'])}, served {e['computed_at']}")


def check_tile_numbers(rows, rep, zoom=None):
    """tile == "z/x/y", x and y inside the zoom level, one zoom."""
    for r in rows:
        z, x, y = r["z"], r["x"], r["y"]
        rep.check(r["tile"] == f"{z}/{x}/{y}", f"tile {r['tile']!r}: but z/x/y columns {z}/{x}/{y}")
        rep.check(0 <= x < 2 ** z and 0 <= y < 2 ** z, f"tile {r['tile']}: x or y outside zoom {z}")
        if zoom is not None:
            rep.check(z == zoom, f"tile {r['tile']}: zoom {z}, the export's metadata says {zoom}")
        if "quadkey" in r:
            rep.check(r["quadkey"] == quadkey(z, x, y),
                      f"tile {r['tile']}: quadkey {r['quadkey']!r}, expected {quadkey(z, x, y)!r}")


def check_order(rows, rep):
    """docs/export.md: rows in tile key order (zoom, x, y)."""
    keys = [(r["z"], r["x"], r["y"]) for r in rows]
    for i in range(1, len(keys)):
        if keys[i] == keys[i - 1]:
            rep.fail(f"tile {rows[i]['tile']}: exported twice (rows {i - 1} and {i})")
            break
        if keys[i] < keys[i - 1]:
            rep.fail(f"tile {rows[i]['tile']} (row {i}) comes after {rows[i - 1]['tile']}: "
                     f"rows are not in tile order (z, x, y)")
            break


# --- Parquet ----------------------------------------------------------------------

def is_utc_seconds_timestamp(t):
    """timestamp, UTC. Parquet has no seconds unit: a file written without the
    Arrow schema reads back as milliseconds, which we accept (values are then
    checked to be whole seconds)."""
    return pa.types.is_timestamp(t) and t.unit in ("s", "ms") and t.tz in UTC_ZONES


def check_schema(schema, geo, rep):
    """Names and types of the columns; returns dim (the fixed list size)."""
    want = {
        "tile": pa.string(),
        "quadkey": pa.string(),
        "z": pa.uint8(),
        "x": pa.uint32(),
        "y": pa.uint32(),
        "model_version": pa.string(),
        "sequence": pa.int64(),
        "drift": pa.float32(),
    }
    bbox_type = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
    names = list(schema.names)
    expected_names = list(want) + ["computed_at", "embedding"] + (["bbox", "geometry"] if geo else [])
    rep.check(sorted(names) == sorted(expected_names),
              f"columns {names}, expected exactly {expected_names}")
    rep.check(len(set(names)) == len(names), f"duplicate column names in {names}")
    for name, t in want.items():
        if name in names:
            got = schema.field(name).type
            rep.check(got == t, f"column {name}: type {got}, expected {t}")
    if "computed_at" in names:
        got = schema.field("computed_at").type
        hint = ""
        if got == pa.int64():
            hint = (" (Parquet has no seconds unit: arrow-rs stores Timestamp(Second) as a bare INT64 that "
                    "only arrow-rs reads back as a timestamp; Timestamp(Millisecond, \"UTC\") is stored as "
                    "TIMESTAMP(MILLIS, UTC), which every reader knows)")
        rep.check(is_utc_seconds_timestamp(got),
                  f"column computed_at: type {got}, expected timestamp[s, tz=UTC]{hint}")
    dim = None
    if "embedding" in names:
        got = schema.field("embedding").type
        if rep.check(pa.types.is_fixed_size_list(got) and got.value_type == pa.float32(),
                     f"column embedding: type {got}, expected fixed_size_list<float32>[dim]"):
            dim = got.list_size
    if geo:
        if "bbox" in names:
            got = schema.field("bbox").type
            # Children may be declared non-null (they never are null).
            rep.check(pa.types.is_struct(got) and [(f.name, f.type) for f in got]
                      == [(f.name, f.type) for f in bbox_type],
                      f"column bbox: type {got}, expected {bbox_type}")
        if "geometry" in names:
            got = schema.field("geometry").type
            rep.check(got == pa.binary(), f"column geometry: type {got}, expected binary (WKB)")
    return dim


def file_metadata(pf, rep):
    """The file's key-value metadata (where GeoParquet puts `geo`), and a
    check that pyarrow also shows it on the Arrow schema: a file written
    with an ARROW:schema that lacks the keys reads back in pyarrow
    (pq.read_table(...).schema.metadata, pandas) without them."""
    md = dict(pf.metadata.metadata or {})
    md.pop(b"ARROW:schema", None)
    shown = pf.schema_arrow.metadata or {}
    for key in (b"geo", b"osmvec"):
        if key in md and key not in shown:
            rep.fail(f"file metadata {key.decode()!r} is in the Parquet footer but not on the Arrow schema "
                     f"pyarrow reads (pq.read_table(f).schema.metadata lacks it): the ARROW:schema "
                     f"stored in the file was written without the key-value metadata")
    return md


def metadata_json(md, key, rep):
    raw = (md or {}).get(key.encode())
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        rep.fail(f"file metadata {key!r} is not JSON: {e}")
        return None


def check_osmvec_metadata(meta, dim, rows, rep):
    if not rep.check(isinstance(meta, dict), "file metadata 'osmvec' missing or not a JSON object"):
        return
    for k in ("dim", "model_versions", "store_sequence", "zoom"):
        rep.check(k in meta, f"file metadata 'osmvec' lacks {k!r}: {meta}")
    if "dim" in meta:
        rep.check(meta["dim"] == dim, f"osmvec.dim {meta['dim']}, embedding column holds {dim} floats")
    if "model_versions" in meta:
        mv = meta["model_versions"]
        rep.check(isinstance(mv, list) and all(isinstance(v, str) for v in mv),
                  f"osmvec.model_versions {mv!r} is not a list of strings")
        in_rows = sorted({r["model_version"] for r in rows})
        if isinstance(mv, list):
            rep.check(sorted(set(mv)) == in_rows,
                      f"osmvec.model_versions {mv}, rows hold {in_rows}")
    if "store_sequence" in meta and rows:
        ss = meta["store_sequence"]
        top = max(r["sequence"] for r in rows)
        rep.check(isinstance(ss, int) and ss >= top,
                  f"osmvec.store_sequence {ss!r} is below the newest row's sequence {top}")
    if "zoom" in meta:
        rep.check(isinstance(meta["zoom"], int), f"osmvec.zoom {meta['zoom']!r} is not an integer")
    if "tiles" in meta:
        rep.check(meta["tiles"] == len(rows), f"osmvec.tiles {meta['tiles']!r}, the file holds {len(rows)} rows")
    bbox = meta.get("bbox")
    if bbox is not None:
        # The requested W,S,E,N: every exported tile meets it (edges included).
        if rep.check(isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(c, (int, float)) for c in bbox),
                     f"osmvec.bbox {bbox!r} is not [W, S, E, N]"):
            W, S, E, N = bbox
            for r in rows:
                w, s, e, n = tile_bounds(r["z"], r["x"], r["y"])
                if not (w <= E + TOL and e >= W - TOL and s <= N + TOL and n >= S - TOL):
                    rep.fail(f"tile {r['tile']}: outside the requested bbox {bbox}")


def table_rows(table, rep):
    """The table as a list of dicts, values checked for nulls and whole seconds."""
    for name in table.column_names:
        if name != "drift":
            nulls = table.column(name).null_count
            rep.check(nulls == 0, f"column {name}: {nulls} null values")
    rep.stop_if_failed()
    emb = table.column("embedding").combine_chunks()
    if emb.type.value_type == pa.float32() and len(emb) > 0:
        rep.check(emb.values.null_count == 0, "column embedding: null floats inside vectors")
        flat = emb.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.reshape(len(emb), emb.type.list_size).astype(np.float32, copy=False)
    else:
        vectors = np.zeros((0, 0), np.float32)
    ts = table.column("computed_at").cast(pa.int64()).to_pylist()
    unit = table.schema.field("computed_at").type.unit
    per_s = {"s": 1, "ms": 1000}[unit]
    cols = {n: table.column(n).to_pylist() for n in ("tile", "quadkey", "z", "x", "y",
                                                     "model_version", "sequence", "drift")}
    rows = []
    for i in range(table.num_rows):
        r = {n: cols[n][i] for n in cols}
        if ts[i] % per_s:
            rep.fail(f"tile {r['tile']}: computed_at has a fraction of a second ({ts[i]} {unit})")
        r["computed_at"] = dt.datetime.fromtimestamp(ts[i] // per_s, dt.timezone.utc)
        r["drift"] = None if r["drift"] is None else np.float32(r["drift"])
        r["embedding"] = vectors[i]
        rows.append(r)
    return rows


def check_geo(md, table, rows, rep):
    """The `geo` metadata, the covering and each row's geometry (pyarrow + shapely)."""
    import pyproj
    import shapely

    geo = metadata_json(md, "geo", rep)
    if not rep.check(isinstance(geo, dict), "file metadata 'geo' (GeoParquet) missing"):
        raise Failed()
    rep.check(geo.get("version") == "1.1.0", f"geo.version {geo.get('version')!r}, expected '1.1.0'")
    rep.check(geo.get("primary_column") == "geometry",
              f"geo.primary_column {geo.get('primary_column')!r}, expected 'geometry'")
    cols = geo.get("columns") or {}
    rep.check(list(cols) == ["geometry"], f"geo.columns describes {list(cols)}, expected ['geometry']")
    col = cols.get("geometry") or {}
    rep.check(col.get("encoding") == "WKB", f"geo encoding {col.get('encoding')!r}, expected 'WKB'")
    rep.check(col.get("geometry_types") == ["Polygon"],
              f"geo geometry_types {col.get('geometry_types')!r}, expected ['Polygon']")
    rep.check(col.get("edges", "planar") == "planar", f"geo edges {col.get('edges')!r}: tiles have planar edges")
    crs = col.get("crs")
    if rep.check(isinstance(crs, dict), f"geo crs {crs!r}: expected PROJJSON (omitting it means CRS84 too, but we write it)"):
        try:
            c = pyproj.CRS.from_json_dict(crs)
            rep.check(c.equals(pyproj.CRS("EPSG:4326"), ignore_axis_order=True),
                      f"geo crs is {c.name!r}, not WGS 84 lon/lat")
        except pyproj.exceptions.CRSError as e:
            rep.fail(f"geo crs is not PROJJSON pyproj reads: {e}")
    covering = {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    rep.check(col.get("covering") == covering, f"geo covering {col.get('covering')!r}, expected {covering}")
    orientation = col.get("orientation")
    rep.check(orientation in (None, "counterclockwise"), f"geo orientation {orientation!r}")

    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    bb = table.column("bbox").to_pylist()
    for r, g, b in zip(rows, geoms, bb):
        tile = r["tile"]
        if not rep.check(g.geom_type == "Polygon", f"tile {tile}: geometry is a {g.geom_type}, expected Polygon"):
            continue
        rep.check(len(g.interiors) == 0 and len(g.exterior.coords) == 5 and g.exterior.is_closed,
                  f"tile {tile}: polygon is not one closed ring of 4 corners: {g.wkt}")
        # docs/export.md promises counter-clockwise rings (as GeoParquet's
        # "orientation": "counterclockwise" would).
        rep.check(g.exterior.is_ccw, f"tile {tile}: exterior ring is clockwise (docs/export.md: counter-clockwise)")
        gb = g.bounds
        rep.check(all(close(b[k], v) for k, v in zip(("xmin", "ymin", "xmax", "ymax"), gb)),
                  f"tile {tile}: bbox column {b} is not the geometry's bounds {gb}")
    file_bbox = col.get("bbox")
    if rows:
        union = shapely.total_bounds(geoms).tolist()
        rep.check(isinstance(file_bbox, list) and len(file_bbox) == 4
                  and all(close(a, u) for a, u in zip(file_bbox, union)),
                  f"geo bbox {file_bbox}, the rows' geometries span {union}")
    return geo


def check_with_geopandas(path, rows, rep):
    """What a GIS user sees: geopandas' own reading of the file."""
    import geopandas
    import pyproj
    import shapely

    gdf = geopandas.read_parquet(path)
    rep.check(gdf.geometry.name == "geometry", f"geopandas' active geometry is {gdf.geometry.name!r}")
    rep.check(gdf.crs is not None and gdf.crs.equals(pyproj.CRS("EPSG:4326"), ignore_axis_order=True),
              f"geopandas reads CRS {gdf.crs}, not WGS 84 lon/lat")
    rep.check(len(gdf) == len(rows), f"geopandas reads {len(gdf)} rows, pyarrow {len(rows)}")
    for tile, z, x, y, g in zip(gdf["tile"], gdf["z"], gdf["x"], gdf["y"], gdf.geometry):
        w, s, e, n = tile_bounds(int(z), int(x), int(y))
        corners = [(w, s), (e, s), (e, n), (w, n)]
        coords = list(g.exterior.coords)[:-1] if g is not None and g.geom_type == "Polygon" else []
        ok = len(coords) == 4 and all(any(close(cx, px) and close(cy, py) for px, py in coords)
                                      for cx, cy in corners)
        rep.check(ok, f"tile {tile}: polygon {g.wkt if g is not None else None} is not the tile's bounds "
                      f"W {w!r} S {s!r} E {e!r} N {n!r}")
    # A bbox read: geopandas filters row groups and rows on the covering
    # column; a box inside one tile must find that tile and no other.
    if rows:
        r = rows[len(rows) // 2]
        w, s, e, n = tile_bounds(r["z"], r["x"], r["y"])
        dx, dy = (e - w) / 4, (n - s) / 4
        hit = geopandas.read_parquet(path, bbox=(w + dx, s + dy, e - dx, n - dy))
        rep.check(list(hit["tile"]) == [r["tile"]],
                  f"geopandas.read_parquet(bbox=inside {r['tile']}) finds {list(hit['tile'])[:5]}")
        rep.check(all(isinstance(g, shapely.Polygon) for g in hit.geometry), "bbox read: not polygons")
    return gdf


def check_parquet(path, expected_path, geo, rep):
    pf = pq.ParquetFile(path)
    md = file_metadata(pf, rep)
    table = pf.read()
    dim = check_schema(table.schema, geo, rep)
    if not geo:
        rep.check(b"geo" not in md, "--format parquet file carries 'geo' metadata")
    rep.stop_if_failed()
    rows = table_rows(table, rep)
    meta = metadata_json(md, "osmvec", rep)
    check_osmvec_metadata(meta, dim, rows, rep)
    zoom = meta.get("zoom") if isinstance(meta, dict) else None
    check_tile_numbers(rows, rep, zoom)
    check_order(rows, rep)
    summary = {"format": "geoparquet" if geo else "parquet", "file": path, "rows": len(rows),
               "dim": dim, "row_groups": pf.num_row_groups,
               "computed_at_unit": table.schema.field("computed_at").type.unit}
    if isinstance(meta, dict):
        summary.update({k: meta.get(k) for k in ("model_versions", "store_sequence", "zoom")})
    if geo:
        g = check_geo(md, table, rows, rep)
        check_with_geopandas(path, rows, rep)
        summary["bbox"] = g.get("columns", {}).get("geometry", {}).get("bbox")
    rep.stop_if_failed()
    compare_rows(rows, load_expected(expected_path, rep), rep)
    summary["tiles_matched"] = len(rows)
    return summary


# --- .npy + sidecar CSV ---------------------------------------------------------

def check_npy(path, expected_path, rep):
    arr = np.load(path, allow_pickle=False)
    rep.check(arr.dtype == np.dtype("<f4"), f"{path}: dtype {arr.dtype}, expected little-endian float32")
    rep.check(arr.ndim == 2, f"{path}: shape {arr.shape}, expected [N, dim]")
    rep.stop_if_failed()
    side = path + ".tiles.csv"
    with open(side, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        lines = list(reader)
    rep.check(header in (CSV_HEADER, CSV_HEADER_ROW), f"{side}: header {header}, expected {CSV_HEADER_ROW} "
              f"(or without row)")
    rep.check(len(lines) == arr.shape[0], f"{side}: {len(lines)} rows, {path} has {arr.shape[0]} vectors")
    rep.stop_if_failed()
    rows = []
    for i, line in enumerate(lines):
        where = f"{side} line {i + 2}"
        if not rep.check(len(line) == len(header), f"{where}: {len(line)} fields"):
            continue
        if header == CSV_HEADER_ROW:
            if line[0] != str(i):
                rep.fail(f"{where}: row {line[0]!r}, but it describes .npy row {i}")
            line = line[1:]
        tile, z, x, y, mv, seq, at, drift = line
        t = parse_rfc3339(at)
        if not rep.check(t is not None, f"{where} ({tile}): computed_at {at!r} is not RFC 3339"):
            continue
        try:
            r = {"tile": tile, "z": int(z), "x": int(x), "y": int(y), "model_version": mv,
                 "sequence": int(seq), "computed_at": t,
                 "drift": None if drift == "" else np.float32(float(drift)),
                 "embedding": arr[i]}
        except ValueError as e:
            rep.fail(f"{where} ({tile}): {e}")
            continue
        rows.append(r)
    zooms = {r["z"] for r in rows}
    rep.check(len(zooms) <= 1, f"{side}: several zoom levels {sorted(zooms)}")
    check_tile_numbers(rows, rep)
    rep.stop_if_failed()
    compare_rows(rows, load_expected(expected_path, rep), rep)
    check_order(rows, rep)
    return {"format": "npy", "file": path, "rows": len(rows), "dim": int(arr.shape[1]),
            "csv_row_column": header == CSV_HEADER_ROW,
            "model_versions": sorted({r["model_version"] for r in rows}), "tiles_matched": len(rows)}


# --- embed-points -----------------------------------------------------------------

LON_NAMES = ("lon", "lng", "long", "longitude", "x")
LAT_NAMES = ("lat", "latitude", "y")


def pick(names, wanted, path):
    """The column of `names` matching one of `wanted`, any case (docs/export.md)."""
    for n in names:
        if n.lower() in wanted:
            return n
    raise ValueError(f"{path}: no column named any of {wanted}")


def read_points_input(path):
    """(ids or None, lons, lats) of a points.csv / points.parquet input."""
    if path.endswith(".parquet"):
        t = pq.read_table(path)
        names = t.column_names
        idc = next((n for n in names if n.lower() == "id"), None)
        ids = t.column(idc).to_pylist() if idc else None
        return (ids, t.column(pick(names, LON_NAMES, path)).to_pylist(),
                t.column(pick(names, LAT_NAMES, path)).to_pylist())
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        names = reader.fieldnames or []
    idc = next((n for n in names if n.lower() == "id"), None)
    ids = [r[idc] for r in rows] if idc else None
    lonc, latc = pick(names, LON_NAMES, path), pick(names, LAT_NAMES, path)
    return ids, [float(r[lonc]) for r in rows], [float(r[latc]) for r in rows]


def check_points(path, args, rep):
    pf = pq.ParquetFile(path)
    md = file_metadata(pf, rep)
    table = pf.read()
    schema = table.schema
    names = list(schema.names)
    core = ["lon", "lat", "embedding"]
    rep.check(names in (core, ["id"] + core) or sorted(names) in (sorted(core), sorted(["id"] + core)),
              f"columns {names}, expected [id,] lon, lat, embedding")
    for n in ("lon", "lat"):
        if n in names:
            rep.check(schema.field(n).type == pa.float64(), f"column {n}: type {schema.field(n).type}, expected double")
    dim = None
    if "embedding" in names:
        t = schema.field("embedding").type
        if rep.check(pa.types.is_fixed_size_list(t) and t.value_type == pa.float32(),
                     f"column embedding: type {t}, expected fixed_size_list<float32>[dim]"):
            dim = t.list_size
    for n in names:
        rep.check(table.column(n).null_count == 0, f"column {n}: {table.column(n).null_count} nulls")
    meta = metadata_json(md, "osmvec", rep)
    if rep.check(isinstance(meta, dict), "file metadata 'osmvec' missing or not a JSON object"):
        rep.check(isinstance(meta.get("model_version"), str),
                  f"osmvec.model_version {meta.get('model_version')!r} is not a string")
        rep.check(meta.get("dim") == dim, f"osmvec.dim {meta.get('dim')!r}, embedding holds {dim} floats")
        if "points" in meta:
            rep.check(meta["points"] == table.num_rows,
                      f"osmvec.points {meta['points']!r}, the file holds {table.num_rows} rows")
        if args.model_version is not None:
            rep.check(meta.get("model_version") == args.model_version,
                      f"osmvec.model_version {meta.get('model_version')!r}, expected {args.model_version!r}")
    if args.dim is not None:
        rep.check(dim == args.dim, f"embedding holds {dim} floats, expected {args.dim}")
    if args.expect_rows is not None:
        rep.check(table.num_rows == args.expect_rows, f"{table.num_rows} rows, expected {args.expect_rows}")
    rep.stop_if_failed()

    emb = table.column("embedding").combine_chunks()
    vec = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), dim)
    lon = table.column("lon").to_numpy()
    lat = table.column("lat").to_numpy()
    ids = table.column("id").to_pylist() if "id" in names else None
    norms = np.linalg.norm(vec.astype(np.float64), axis=1)
    for i in range(table.num_rows):
        where = f"row {i}" + (f" (id {ids[i]})" if ids else "") + f" at lon {lon[i]} lat {lat[i]}"
        rep.check(-180.0 <= lon[i] <= 180.0 and -90.0 <= lat[i] <= 90.0, f"{where}: outside lon/lat range")
        if not rep.check(np.isfinite(vec[i]).all(), f"{where}: vector has non-finite values"):
            continue
        if not args.allow_non_unit:
            rep.check(abs(norms[i] - 1.0) <= 1e-4, f"{where}: vector norm {norms[i]}, expected 1")
    if args.input:
        in_ids, in_lon, in_lat = read_points_input(args.input)
        rep.check(len(in_lon) == table.num_rows, f"{table.num_rows} rows for {len(in_lon)} input points")
        rep.check((in_ids is None) == (ids is None),
                  f"input {'has' if in_ids is not None else 'has no'} id column, output "
                  f"{'has' if ids is not None else 'has no'}")
        for i in range(min(len(in_lon), table.num_rows)):
            if in_ids is not None and ids is not None and str(in_ids[i]) != str(ids[i]):
                rep.fail(f"row {i}: id {ids[i]!r}, input row has {in_ids[i]!r}")
            if lon[i] != in_lon[i] or lat[i] != in_lat[i]:
                rep.fail(f"row {i}: lon/lat {lon[i]}, {lat[i]}, input row has {in_lon[i]}, {in_lat[i]}")
    matched, worst = 0, 0.0
    expected = args.expected or args.expected_json
    if expected:
        with open(expected) as f:
            answers = json.load(f)
        at = {(float(lo), float(la)): i for i, (lo, la) in enumerate(zip(lon, lat))}
        by_id = {str(v): i for i, v in enumerate(ids)} if ids is not None else {}
        for a in answers:
            if "id" in a and ids is not None:
                i = by_id.get(str(a["id"]))
                what = f"id {a['id']!r}"
            else:
                i = at.get((float(a["lon"]), float(a["lat"])))
                what = f"lon {a['lon']} lat {a['lat']}"
            if not rep.check(i is not None, f"/v1/embed point {what} not in the output"):
                continue
            where = f"row {i} ({what})"
            if not (close(lon[i], float(a["lon"]), 1e-12) and close(lat[i], float(a["lat"]), 1e-12)):
                rep.fail(f"{where}: at lon {lon[i]} lat {lat[i]}, /v1/embed was asked for {a['lon']}, {a['lat']}")
            want = np.asarray(a["vector"], np.float32)
            if want.shape != vec[i].shape:
                rep.fail(f"{where}: {vec[i].shape[0]} floats, /v1/embed serves {want.shape[0]}")
                continue
            d = float(np.max(np.abs(vec[i].astype(np.float64) - want)))
            worst = max(worst, d)
            rep.check(d <= args.atol, f"{where}: largest difference {d} to /v1/embed's vector (atol {args.atol})")
            if isinstance(meta, dict):
                rep.check(a.get("model_version") == meta.get("model_version"),
                          f"{where}: /v1/embed model_version {a.get('model_version')!r}, "
                          f"file {meta.get('model_version')!r}")
            matched += 1
    return {"format": "points", "file": path, "rows": table.num_rows, "dim": dim,
            "model_version": meta.get("model_version") if isinstance(meta, dict) else None,
            "has_id": ids is not None, "norm_min": float(norms.min()) if len(norms) else None,
            "norm_max": float(norms.max()) if len(norms) else None, "expected_matched": matched,
            "expected_max_abs_diff": worst}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("expected_json", nargs="?",
                    help="JSON list of /v1/tiles/{z}/{x}/{y} answers (--points: of /v1/embed answers)")
    ap.add_argument("--format", choices=("geoparquet", "parquet", "npy"), default="geoparquet")
    ap.add_argument("--points", action="store_true", help="FILE is embed-points output")
    ap.add_argument("--expect-rows", type=int)
    ap.add_argument("--input", help="--points: the points.csv / points.parquet the output came from")
    ap.add_argument("--expected", help="--points: JSON list of /v1/embed answers (or as EXPECTED_JSON)")
    ap.add_argument("--atol", type=float, default=1e-5, help="--points: largest difference to /v1/embed")
    ap.add_argument("--expect-model-version", "--model-version", dest="model_version")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--allow-non-unit", action="store_true", help="--points: finite vectors suffice")
    args = ap.parse_args()
    rep = Report()
    summary = {}
    try:
        if args.points:
            summary = check_points(args.file, args, rep)
        else:
            if args.expected_json is None:
                ap.error("EXPECTED_JSON is required for a tile export")
            if args.format == "npy":
                summary = check_npy(args.file, args.expected_json, rep)
            else:
                summary = check_parquet(args.file, args.expected_json, args.format == "geoparquet", rep)
            if args.expect_rows is not None:
                rep.check(summary["rows"] == args.expect_rows,
                          f"{summary['rows']} rows, expected {args.expect_rows}")
    except Failed:
        pass
    except (OSError, pa.ArrowException, ValueError, KeyError) as e:
        rep.fail(f"{args.file}: cannot be read as expected: {type(e).__name__}: {e}")
    rep.finish(summary)


if __name__ == "__main__":
    main()
