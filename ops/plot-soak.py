#!/usr/bin/env python3
"""Draws ops/soak.sh's samples: RSS and open files of each process, and the
store's size with the applied sequence, against time.

    $(bash ops/py-readers.sh) ops/plot-soak.py DIR/samples.csv OUT.png
"""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    by = defaultdict(list)
    for r in rows:
        by[r["process"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    for name, rs in sorted(by.items()):
        t = [int(r["elapsed_s"]) / 60 for r in rs]
        axes[0].plot(t, [int(r["rss_kb"]) / 1024 for r in rs], label=name)
        axes[1].plot(t, [int(r["open_files"]) for r in rs], label=name)
    axes[0].set_title("resident memory (MB)")
    axes[1].set_title("open files")
    first = next(iter(by.values()))
    t = [int(r["elapsed_s"]) / 60 for r in first]
    axes[2].plot(t, [int(r["store_bytes"]) / 1e6 for r in first], color="black", label="store (MB)")
    axes[2].set_title("store on disk (MB) and applied sequence")
    ax2 = axes[2].twinx()
    ax2.plot(t, [float(r["applied_sequence"] or 0) for r in first], color="tab:red", label="sequence")
    ax2.tick_params(axis="y", colors="tab:red")
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
