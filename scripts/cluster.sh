#!/usr/bin/env bash
# The local multi-node run (`make cluster`, `make cluster-stop`): HAProxy on 127.0.0.1:8080 in
# front of two web instances (8101, 8102), PgBouncer (transaction mode) on 6433 in front of
# PostgreSQL, two Celery workers and the webhook sweep's own, one beat and the fix stream consumer, all under supervisord
# with deploy/cluster/supervisord.conf. docs/operations.md ("A local cluster") explains it.
#
#   scripts/cluster.sh start            migrate, seed, then run in the foreground (Ctrl-C stops all)
#   scripts/cluster.sh start --detach   the same in the background; output in var/log/cluster.log
#   scripts/cluster.sh stop             stop every process of the cluster (waits for them)
#   scripts/cluster.sh status           supervisorctl status + HAProxy's view of the web instances
#
# `start` when the cluster already runs says so and changes nothing, so it is safe to run again.
# `make cluster` runs scripts/setup.sh first (haproxy and pgbouncer are among its packages).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$ROOT/.venv/bin/python"
CONF="$ROOT/deploy/cluster/supervisord.conf"
RUN_DIR="$ROOT/var/run"
LOG_DIR="$ROOT/var/log"
PIDFILE="$RUN_DIR/cluster-supervisord.pid"
SOCK="$RUN_DIR/cluster-supervisord.sock"
DETACHED_LOG="$LOG_DIR/cluster.log"

LB_PORT=8080
WEB_PORTS=(8101 8102)
PGBOUNCER_PORT=6433
STATS_PORT=8404
# Migrations and seeding go to PostgreSQL directly (DDL and long transactions do not belong in
# a transaction pool); every supervised process goes through PgBouncer.
DIRECT_DATABASE_URL="postgis://dispatch:dispatch@127.0.0.1:5432/dispatch"
POOLED_DATABASE_URL="postgis://dispatch:dispatch@127.0.0.1:$PGBOUNCER_PORT/dispatch"
# The web instances' pool: the same database, with the web's statement and lock timeouts
# (deploy/cluster/pgbouncer.ini).
WEB_DATABASE_URL="postgis://dispatch:dispatch@127.0.0.1:$PGBOUNCER_PORT/dispatch_web"

say() { printf '==> %s\n' "$*"; }
ok() { printf '    %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

supervisor_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q supervisord "/proc/$pid/cmdline" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

ctl() { supervisorctl -c "$CONF" "$@"; }

port_holder() { ss -Hltnp "sport = :$1" 2>/dev/null | head -n 1; }

lb_ready() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$LB_PORT/health/ready")" = "200" ]
}

# HAProxy's view of the web instances: "web1 UP", ...
lb_servers() {
  "$PY" - "$RUN_DIR/cluster-haproxy.sock" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
for row in rows:
    if row[0] == "web" and row[1] not in ("BACKEND",):
        print(f"    haproxy: {row[1]:<10} {row[17]}")
PYEOF
}

environment() {
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  export DATABASE_URL="$POOLED_DATABASE_URL"
  export CLUSTER_WEB_DATABASE_URL="$WEB_DATABASE_URL"
  export DB_BEHIND_PGBOUNCER=true
  export CLUSTER_RUN_DIR="$RUN_DIR"
  export CLUSTER_CELERY_CONCURRENCY="${CLUSTER_CELERY_CONCURRENCY:-1}"
  if [ "$(id -u)" -eq 0 ]; then
    export CLUSTER_PGBOUNCER_USER=postgres
  else
    CLUSTER_PGBOUNCER_USER="$(id -un)"
    export CLUSTER_PGBOUNCER_USER
  fi
  # Links in tracking URLs and e-mails point at the load balancer.
  export TRACKING_BASE_URL="${TRACKING_BASE_URL:-http://127.0.0.1:$LB_PORT/track}"
  export SITE_URL="${SITE_URL:-http://127.0.0.1:$LB_PORT}"
  # One multiprocess metrics directory for the processes of this host, emptied at each start.
  export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/prometheus/cluster"
  rm -rf "$PROMETHEUS_MULTIPROC_DIR"
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
}

prepare_database() {
  say "Database (directly on 127.0.0.1:5432): make migrate, then the demo data as make run"
  DATABASE_URL="$DIRECT_DATABASE_URL" make --no-print-directory -C "$ROOT" migrate
  DATABASE_URL="$DIRECT_DATABASE_URL" "$PY" manage.py seed_demo
}

check_ports() {
  local port holder busy=0
  for port in "$LB_PORT" "${WEB_PORTS[@]}" "$PGBOUNCER_PORT" "$STATS_PORT"; do
    holder="$(port_holder "$port")"
    if [ -n "$holder" ]; then
      printf 'ERROR: port %s is taken: %s\n' "$port" "$holder" >&2
      busy=1
    fi
  done
  [ "$busy" -eq 0 ] || die "free the ports above (another cluster, or the Debian haproxy/pgbouncer services?) and run again"
}

command -v supervisord >/dev/null || die "supervisord not found: run scripts/setup.sh as root (package supervisor)"
[ -x /usr/sbin/haproxy ] || die "haproxy not found: run scripts/setup.sh as root (package haproxy)"
[ -x /usr/sbin/pgbouncer ] || die "pgbouncer not found: run scripts/setup.sh as root (package pgbouncer)"

# Until the load balancer's /health/ready answers 200, while supervisord (pid $1) runs.
wait_ready() {
  local i
  for ((i = 0; i < 90; i++)); do
    if ! kill -0 "$1" 2>/dev/null; then
      return 1
    fi
    if lb_ready; then
      return 0
    fi
    sleep 1
  done
  return 1
}

summary() {
  cat <<EOF

Load balancer:       http://127.0.0.1:$LB_PORT/   (HAProxy status page http://127.0.0.1:$STATS_PORT/)
Web instances:       http://127.0.0.1:${WEB_PORTS[0]}/  http://127.0.0.1:${WEB_PORTS[1]}/
PgBouncer:           127.0.0.1:$PGBOUNCER_PORT (transaction mode) -> PostgreSQL 127.0.0.1:5432
Ops login:           ops / ${DEMO_OPS_PASSWORD:-ops}
Processes:           scripts/cluster.sh status      Stop: make cluster-stop (or Ctrl-C in the foreground)
EOF
}

start() {
  local detach=0
  [ "${1:-}" = "--detach" ] && detach=1
  local pid
  if pid="$(supervisor_pid)"; then
    say "The cluster already runs (supervisord pid $pid); nothing changed"
    ctl status || true
    exit 0
  fi
  rm -f "$PIDFILE" "$SOCK"
  check_ports
  prepare_database
  environment
  say "Starting the cluster (supervisord -c deploy/cluster/supervisord.conf)"
  if [ "$detach" -eq 1 ]; then
    nohup supervisord -n -c "$CONF" >>"$DETACHED_LOG" 2>&1 </dev/null &
    pid=$!
    disown
    if wait_ready "$pid"; then
      ctl status || true
      summary
      ok "output: $DETACHED_LOG"
    else
      tail -n 40 "$DETACHED_LOG" >&2
      die "the cluster did not become ready within 90 s (output above, all of it in $DETACHED_LOG)"
    fi
    return
  fi
  # Foreground: supervisord prints every process's output here. Ctrl-C (SIGINT reaches
  # supervisord too) or SIGTERM stops every process; the script waits until they are gone.
  supervisord -n -c "$CONF" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
  if wait_ready "$pid"; then
    summary
  fi
  local rc=0
  wait "$pid" || rc=$?
  # `wait` returns early when a trapped signal arrives: wait for supervisord itself.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || rc=$?
  done
  exit "$rc"
}

stop() {
  local pid i
  if ! pid="$(supervisor_pid)"; then
    say "The cluster is not running"
    rm -f "$PIDFILE" "$SOCK"
    return
  fi
  say "Stopping the cluster (supervisord pid $pid; the workers finish their running tasks)"
  kill -TERM "$pid"
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    die "supervisord (pid $pid) still runs after 100 s; see $DETACHED_LOG or its terminal"
  fi
  ok "stopped"
}

status() {
  if ! supervisor_pid >/dev/null; then
    say "The cluster is not running"
    exit 3
  fi
  local rc=0
  ctl status || rc=$?
  lb_servers || true
  if lb_ready; then ok "load balancer: /health/ready 200"; else ok "load balancer: /health/ready NOT 200"; rc=1; fi
  exit "$rc"
}

case "${1:-start}" in
  start) shift || true; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start [--detach] | stop | status" ;;
esac
