#!/usr/bin/env python3
"""The timed part of ops/soak.sh: a light HTTP load on the daemon, and one
sample a minute of every process's RSS, open files and threads, the store's
size on disk and the pipeline's progress (applied and published sequence,
outbox, jobs embedded by the workers).

    python3 ops/soak-monitor.py --dir DIR --minutes M --daemon URL --source URL \\
        --proc NAME=PID ... [--worker URL ...] [--sample-seconds 60]

Writes DIR/samples.csv (one row per sample and process) and DIR/summary.json
(requests by status, first/last/peak RSS and open files per process, the
sequences reached). Stops early, with exit status 1, when a watched process
dies. Standard library only.
"""

import argparse
import csv
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:  # connection refused, timeout: counted, not fatal
        return type(e).__name__, b""


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def metric_sum(text, name):
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def proc_sample(pid):
    try:
        status = open(f"/proc/{pid}/status").read()
        fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        rss_kb = int(fields["VmRSS"].split()[0])
        threads = int(fields["Threads"])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss_kb, fds, threads
    except (OSError, KeyError):
        return None


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class Load(threading.Thread):
    """About one request a second, of the kinds a dashboard and a client make."""

    def __init__(self, daemon, stop):
        super().__init__(daemon=True)
        self.base = daemon.rstrip("/")
        self.stop = stop
        self.codes = {}
        self.lock = threading.Lock()
        self.rng = random.Random(7)

    def count(self, kind, code):
        with self.lock:
            key = f"{kind} {code}"
            self.codes[key] = self.codes.get(key, 0) + 1

    def run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            lat = 4.17 + self.rng.uniform(-0.05, 0.05)
            lon = 73.51 + self.rng.uniform(-0.05, 0.05)
            requests = [("metrics", "/metrics"), ("healthz", "/healthz"),
                        ("tiles", "/v1/tiles?limit=100"),
                        ("embed", f"/v1/embed?lat={lat:.5f}&lon={lon:.5f}")]
            if i % 30 == 0:
                requests.append(("parquet", "/v1/tiles.parquet?bbox=73.4,4.1,73.6,4.3"))
            for kind, path in requests:
                code, _ = get(self.base + path, timeout=30)
                self.count(kind, code)
                if self.stop.wait(0.25):
                    return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--sample-seconds", type=float, default=60)
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--proc", action="append", default=[])
    ap.add_argument("--worker", action="append", default=[])
    a = ap.parse_args()
    procs = [tuple(p.split("=", 1)) for p in a.proc]
    stop = threading.Event()
    load = Load(a.daemon, stop)
    load.start()
    out = open(os.path.join(a.dir, "samples.csv"), "w", newline="")
    w = csv.writer(out)
    w.writerow(["elapsed_s", "process", "rss_kb", "open_files", "threads", "store_bytes",
                "published_sequence", "applied_sequence", "outbox_entries", "worker_jobs"])
    t0 = time.time()
    end = t0 + a.minutes * 60
    first, last, peak = {}, {}, {}
    died = None
    progress = {}
    while True:
        now = time.time()
        _, state = get(a.source + "state.txt")
        published = None
        for line in state.decode(errors="replace").splitlines():
            if line.startswith("sequenceNumber="):
                published = int(line.split("=", 1)[1])
        _, m = get(a.daemon.rstrip("/") + "/metrics")
        m = m.decode(errors="replace")
        applied = metric(m, "osmvec_replication_sequence")
        outbox = metric(m, "osmvec_outbox_entries")
        jobs = 0.0
        for url in a.worker:
            _, wm = get(url.rstrip("/") + "/metrics")
            jobs += metric_sum(wm.decode(errors="replace"), "osmvec_worker_jobs_total") or 0
        store_bytes = dir_bytes(os.path.join(a.dir, "store"))
        progress = {"published_sequence": published, "applied_sequence": applied,
                    "outbox_entries": outbox, "worker_jobs": jobs, "store_bytes": store_bytes}
        for name, pid in procs:
            s = proc_sample(pid)
            if s is None:
                died = died or name
                continue
            row = {"rss_kb": s[0], "open_files": s[1], "threads": s[2]}
            first.setdefault(name, row)
            last[name] = row
            p = peak.setdefault(name, dict(row))
            for k, v in row.items():
                p[k] = max(p[k], v)
            w.writerow([round(now - t0), name, *s, store_bytes, published, applied, outbox, jobs])
        out.flush()
        print(f"soak {round((now - t0) / 60, 1)} min: published {published}, applied {applied}, "
              f"outbox {outbox}, worker jobs {jobs:.0f}, store {store_bytes / 1e6:.1f} MB, "
              + ", ".join(f"{n} {last.get(n, {}).get('rss_kb', 0) / 1024:.0f} MB/"
                          f"{last.get(n, {}).get('open_files', 0)} fds" for n, _ in procs),
              file=sys.stderr, flush=True)
        if died or now >= end:
            break
        time.sleep(max(0.0, min(a.sample_seconds, end - time.time())))
    stop.set()
    load.join(timeout=60)
    summary = {"minutes": round((time.time() - t0) / 60, 2), "died": died,
               "requests": load.codes, "first": first, "last": last, "peak": peak, **progress}
    json.dump(summary, open(os.path.join(a.dir, "summary.json"), "w"), indent=1)
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
