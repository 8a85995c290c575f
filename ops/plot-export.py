#!/usr/bin/env python3
"""Draw a GeoParquet export of osmvec's tile embeddings as a picture.

    $(bash ops/py-readers.sh) ops/plot-export.py EXPORT.parquet OUT.png [--max-kb 150]

EXPORT.parquet is `osmvec export-embeddings` output (GeoParquet, the
default format; docs/export.md). Two panels side by side, each tile drawn as
its polygon:

* left, the embeddings' first three principal components (numpy: the top
  eigenvectors of the covariance) as red, green and blue, each stretched
  over its 2nd–98th percentile: tiles with similar embeddings get similar
  colours, so the map shows the kinds of places the model tells apart;
* right, the tiles' drift (cosine distance to their previous embedding by
  the same model version), tiles without one (first embeddings) in grey.

The PNG is kept small (a palette image when the full-colour one is over
--max-kb KB). Reads the file with geopandas, so it is also a check that a
stock GIS stack opens the export.
"""

import argparse
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
import geopandas  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def pca_rgb(vectors):
    """[n, 3] colours in 0..1 from the first three principal components, and
    the share of variance each explains. The components are the top
    eigenvectors of the dim x dim covariance (numpy.linalg.eigh), which is
    cheaper than an SVD of the n x dim matrix and the same up to sign."""
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(x.T @ x)
    order = np.argsort(eigval)[::-1][:3]
    pcs = np.zeros((x.shape[0], 3))
    pcs[:, : len(order)] = x @ eigvec[:, order]
    lo, hi = np.percentile(pcs, 2, axis=0), np.percentile(pcs, 98, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    rgb = np.clip((pcs - lo) / span, 0.0, 1.0)
    total = eigval.clip(min=0).sum()
    explained = np.zeros(3)
    if total > 0:
        explained[: len(order)] = eigval[order].clip(min=0) / total
    return rgb, explained


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("out")
    ap.add_argument("--max-kb", type=float, default=150)
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args()

    gdf = geopandas.read_parquet(args.export)
    if len(gdf) == 0:
        sys.exit(f"plot-export: {args.export} holds no tiles")
    vectors = np.stack(gdf["embedding"].to_numpy())
    rgb, explained = pca_rgb(vectors)
    drift = gdf["drift"].astype("float64")
    versions = ", ".join(sorted(gdf["model_version"].unique()))

    # Panels shaped like the region (degrees of longitude shrink with cos(lat)).
    xmin, ymin, xmax, ymax = gdf.total_bounds
    aspect = (ymax - ymin) / max((xmax - xmin) * np.cos(np.radians((ymin + ymax) / 2)), 1e-9)
    panel_w = float(np.clip(4.6 / aspect, 3.2, 6.0))
    panel_h = float(np.clip(panel_w * aspect, 2.6, 6.0))
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * panel_w + 1.6, panel_h + 0.9), dpi=args.dpi)
    gdf.plot(ax=left, color=rgb, linewidth=0)
    left.set_title(f"embedding PCA as RGB\n({100 * explained.sum():.0f}% of the variance)", fontsize=10)
    gdf.assign(drift=drift).plot(
        ax=right, column="drift", cmap="magma_r", linewidth=0, legend=True,
        legend_kwds={"label": "drift (1 − cos to previous)", "shrink": 0.7},
        missing_kwds={"color": "lightgrey", "label": "first embedding"},
    )
    n_drift = int(drift.notna().sum())
    right.set_title(f"drift\n({n_drift} of {len(gdf)} tiles; grey: first embedding)", fontsize=10)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.set_xlabel("longitude", fontsize=8)
        ax.set_ylabel("latitude", fontsize=8)
    fig.suptitle(f"{os.path.basename(args.export)}: {len(gdf)} tiles, dim {vectors.shape[1]}, "
                 f"model {versions}", fontsize=11)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=args.dpi, bbox_inches="tight")
    plt.close(fig)
    png = buf.getvalue()
    if len(png) > args.max_kb * 1024:
        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    with open(args.out, "wb") as f:
        f.write(png)
    print(f"plot-export: {args.out} ({len(png) // 1024} KB, {len(gdf)} tiles)", file=sys.stderr)


if __name__ == "__main__":
    main()
