#!/usr/bin/env bash
# Checks the observability files under ops/ without running the daemon:
#   - promtool check config ops/prometheus/prometheus.yml
#   - promtool check rules  ops/prometheus/alerts.yml
#   - promtool test rules   ops/prometheus/alerts_test.yml (each alert firing
#     and not firing)
#   - ops/grafana/osmvec-dashboard.json parses (python3 -m json.tool)
#   - every osmvec_* name in the alert rules and dashboard queries is a metric
#     of docs/observability.md (histograms may take _bucket/_sum/_count)
# Installs Debian's `prometheus` package (which ships promtool) when promtool
# is missing, without leaving a Prometheus server running.
# Exits non-zero on the first failure. `--install` only installs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "check-observability: $*" >&2; }

install_promtool() {
  local SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive

  # The package's maintainer scripts would start a prometheus server (and its
  # recommended node exporter). Forbid service starts for the install with a
  # temporary policy-rc.d, unless one already exists (as in containers).
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from ops/check-observability.sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local before
  before=$(pgrep -x prometheus || true)

  # `apt-get update` only when the package lists do not know the package yet.
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    step "apt-get update"
    $SUDO apt-get update -qq
  fi
  step "installing Debian package prometheus (for promtool)"
  local rc=0
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null || rc=$?

  [ -n "$made_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
  # Belt and braces: stop a server the install started anyway (systemd units
  # ignore policy-rc.d on some setups), but only one that was not running
  # before this script.
  if [ -d /run/systemd/system ] && [ -z "$before" ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  local pid
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
      step "stopping prometheus server $pid started by the package install"
      $SUDO kill "$pid" || true
    fi
  done
  [ "$rc" -eq 0 ] || { step "apt-get install prometheus failed ($rc)"; return "$rc"; }
}

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  install_promtool
fi
# `--install`: only make sure prometheus and promtool are there (ops/test.sh).
if [ "${1:-}" = "--install" ]; then exit 0; fi
command -v promtool >/dev/null 2>&1 || { step "promtool still missing"; exit 1; }
step "using $(promtool --version 2>&1 | head -n1)"

step "promtool check config"
promtool check config ops/prometheus/prometheus.yml

step "promtool check rules"
promtool check rules ops/prometheus/alerts.yml

step "promtool test rules"
promtool test rules ops/prometheus/alerts_test.yml

step "dashboard JSON parses"
python3 -m json.tool ops/grafana/osmvec-dashboard.json >/dev/null

step "metric names in queries are documented"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - docs/observability.md ops/prometheus/alerts.yml ops/grafana/osmvec-dashboard.json "$tmp/dashboard-queries.yml" <<'PY'
import json, re, sys

doc, alerts, dashboard = sys.argv[1:4]

# Metric table rows look like: | `osmvec_name` | type | labels | meaning |
known = set()
for line in open(doc, encoding="utf-8"):
    m = re.match(r"\|\s*`(osmvec_[a-z0-9_]+)`\s*\|\s*([a-z]+)", line)
    if not m:
        continue
    name, kind = m.groups()
    known.add(name)
    if kind == "histogram":
        known.update(name + s for s in ("_bucket", "_sum", "_count"))
if len(known) < 20:
    sys.exit(f"only {len(known)} metric names parsed from {doc}; table format changed?")

exprs = []  # (where, expr)
for i, line in enumerate(open(alerts, encoding="utf-8"), 1):
    exprs.append((f"{alerts}:{i}", line.split("#", 1)[0]))

def walk(node, path):
    # every "expr" (panel targets) and "query" (template variables) string
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query") and isinstance(v, str):
                exprs.append((f"{dashboard}:{path}/{k}", v))
            else:
                walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for j, v in enumerate(node):
            walk(v, f"{path}[{j}]")

walk(json.load(open(dashboard, encoding="utf-8")), "")
n_dash = sum(1 for w, e in exprs if w.startswith(dashboard) and "osmvec_" in e)
if n_dash < 10:
    sys.exit(f"only {n_dash} queries found in {dashboard}")

bad = []
for where, e in exprs:
    for name in re.findall(r"\bosmvec_[a-zA-Z0-9_]+", e):
        if name not in known:
            bad.append(f"{where}: {name}")
if bad:
    sys.exit("metric names not in docs/observability.md:\n  " + "\n  ".join(bad))
print(f"check-observability: {n_dash} dashboard queries and the alert rules use documented metrics only", file=sys.stderr)

# Write the dashboard queries as recording rules, with Grafana's variables
# replaced, so that promtool can check their PromQL syntax.
out = sys.argv[4]
with open(out, "w", encoding="utf-8") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (where, e) in enumerate(exprs):
        if not where.startswith(dashboard) or "osmvec_" not in e or e.startswith("label_values("):
            continue
        e = e.replace("$__rate_interval", "1m").replace("$instance", ".+")
        f.write(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(e)}\n")
PY

step "dashboard queries are valid PromQL"
promtool check rules "$tmp/dashboard-queries.yml" >/dev/null || {
  promtool check rules "$tmp/dashboard-queries.yml" >&2 || true
  exit 1
}

step "all checks passed"
