#!/usr/bin/env bash
# The local Kafka-protocol broker for the demo and for manual testing: tansu
# 0.6.0 from crates.io (../shared/findings.md has its known limits).
#
#   bash ops/broker.sh install          cargo install tansu (once; ~12 min on 2 cores)
#   bash ops/broker.sh start [PORT]     start on 127.0.0.1:PORT (default 9092), memory storage
#   bash ops/broker.sh start-sqlite [PORT] [FILE]   same, data kept in FILE (default broker.db)
#   bash ops/broker.sh stop             SIGTERM the broker started here (PID file)
#   bash ops/broker.sh status           prints "running PID PORT" or "stopped"
#
# State (PID, port, log) lives in ${OSMVEC_BROKER_DIR:-.broker}. Idempotent:
# install does nothing when tansu 0.6.0 is on PATH or in ~/.cargo/bin; start
# does nothing when the recorded broker is alive.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${OSMVEC_BROKER_DIR:-.broker}
version=0.6.0
tansu_bin() {
  if command -v tansu >/dev/null; then command -v tansu
  elif [ -x "$HOME/.cargo/bin/tansu" ]; then echo "$HOME/.cargo/bin/tansu"
  fi
}
install() {
  if [ -n "$(tansu_bin)" ]; then return; fi
  echo "installing tansu $version (cargo install; about 12 minutes on 2 cores)" >&2
  cargo install tansu --version "$version" --locked --features dynostore,libsql
}
alive() { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }
start() {
  local port=$1 storage=$2
  install
  mkdir -p "$dir"
  if alive; then echo "broker already running (pid $(cat "$dir/pid"), port $(cat "$dir/port"))" >&2; return; fi
  # tansu resolves a sqlite path against its working directory.
  local run_dir=.
  case "$storage" in
    sqlite://*)
      local file=${storage#sqlite://}
      run_dir=$(cd "$(dirname "$file")" && pwd)
      storage="sqlite://$(basename "$file")" ;;
  esac
  local bin
  bin=$(tansu_bin)
  local log
  log=$(cd "$dir" && pwd)/broker.log
  (cd "$run_dir" && exec "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$storage" \
    --cluster-id osmvec-local > "$log" 2>&1) &
  echo $! > "$dir/pid"
  echo "$port" > "$dir/port"
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "broker running: 127.0.0.1:$port (pid $(cat "$dir/pid"), log $dir/broker.log)" >&2
      return
    fi
    alive || { echo "broker exited at start; log:" >&2; cat "$dir/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "broker did not listen on $port within 10 s; log $dir/broker.log" >&2
  exit 1
}
case "${1:-}" in
  install) install ;;
  start) start "${2:-9092}" "memory://tansu/" ;;
  start-sqlite) start "${2:-9092}" "sqlite://${3:-broker.db}" ;;
  stop)
    if alive; then
      pid=$(cat "$dir/pid"); kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$dir/pid" ;;
  status) if alive; then echo "running $(cat "$dir/pid") $(cat "$dir/port")"; else echo stopped; fi ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
