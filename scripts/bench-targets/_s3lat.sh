#!/usr/bin/env bash
# shellcheck shell=bash
# A loopback S3 server with added latency, shared by the *-s3 bench targets
# (megafs-s3, rclone-crypt-s3-lat, juicefs-s3-lat).  Sourced, not run.
#
#   client --> fault proxy 127.0.0.1:$S3GW_PORT (+$S3LAT_LATENCY s per request)
#          --> juicefs gateway 127.0.0.1:$S3LAT_GW_PORT (bucket $S3GW_BUCKET)
#
# The server is the one of the shared bench's targets/_s3gw.sh (`juicefs
# gateway` over its own unencrypted JuiceFS volume: SQLite metadata + local
# "file" data store), plus --no-usage-report (nothing leaves 127.0.0.1) and
# --keep-etag (ETags that stay valid for conditional requests).  In front of
# it runs the project's fault proxy (scripts/fault-proxy, megafs/testing/
# faultproxy.py): every request waits S3LAT_LATENCY seconds before it is
# forwarded, i.e. one extra "round trip" per request, independent of its size.
# All three targets go through the same proxy with the same settings.
#
# Provides the names the shared targets/_rclone.sh expects of _s3gw.sh
# (S3GW_PORT = the proxy, what clients use; S3GW_BUCKET/KEY/SECRET/PID,
# s3gw_start, s3gw_stop, s3gw_settings), plus s3lat_pids (gateway + proxy,
# for t_pids) and s3lat_copy_fn.
#
# Env: S3LAT_LATENCY (0.02 s), S3LAT_PORT (proxy, 19101), S3LAT_GW_PORT
# (gateway, 19100), JFS_BIN (default /tmp/jfsvenv/bin/juicefs if present,
# else <project>/.venv/bin/juicefs), FSBENCH_DIR (shared bench).
S3LAT_HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
S3LAT_ROOT=$(cd "$S3LAT_HERE/../.." && pwd)
FSBENCH_DIR=${FSBENCH_DIR:-$S3LAT_ROOT/../shared/bench}
# shellcheck source=/dev/null
. "$FSBENCH_DIR/targets/_common.sh" || return 1

if [ -z "${JFS_BIN:-}" ]; then
  if [ -x /tmp/jfsvenv/bin/juicefs ]; then JFS_BIN=/tmp/jfsvenv/bin/juicefs
  else JFS_BIN=$S3LAT_ROOT/.venv/bin/juicefs; fi
fi
JFS=$JFS_BIN
S3LAT_LATENCY=${S3LAT_LATENCY:-0.02}
S3LAT_GW_PORT=${S3LAT_GW_PORT:-19100}
S3GW_PORT=${S3LAT_PORT:-19101}              # clients talk to the proxy
S3GW_URL=http://127.0.0.1:$S3GW_PORT
S3GW_META=sqlite3://$FSB_ROOT/backend/s3gw-meta.db
S3GW_DATA=$FSB_ROOT/backend/s3gw-data/
S3GW_CACHE=$FSB_ROOT/cache/s3gw
S3GW_PID=$FSB_STATE/s3gw.pid
S3LAT_PROXY_PID=$FSB_STATE/s3lat-proxy.pid
S3GW_BUCKET=fsbenchs3
S3GW_KEY=fsbench
S3GW_SECRET=fsbench-not-a-secret

# s3lat_copy_fn OLD NEW: define NEW with OLD's body (to wrap a function
# before redefining it)
s3lat_copy_fn() {
  local body
  body=$(declare -f "$1") || return 1
  eval "$2${body#"$1"}"
}

s3gw_settings() {
  echo "S3 server: juicefs format --storage file --bucket $S3GW_DATA --trash-days 0 $S3GW_META $S3GW_BUCKET;"
  echo "MINIO_ROOT_USER=$S3GW_KEY MINIO_ROOT_PASSWORD=... juicefs gateway $S3GW_META 127.0.0.1:$S3LAT_GW_PORT --no-banner --no-usage-report --keep-etag --metrics 127.0.0.1:${S3LAT_METRICS_PORT:-19102} --cache-dir $S3GW_CACHE --backup-meta 0 (bucket = volume name $S3GW_BUCKET);"
  echo "in front of it: scripts/fault-proxy --listen 127.0.0.1:$S3GW_PORT --upstream http://127.0.0.1:$S3LAT_GW_PORT --latency $S3LAT_LATENCY (added per request, before forwarding); clients use $S3GW_URL"
}

s3gw_start() {
  local p
  for p in "$S3LAT_GW_PORT" "$S3GW_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      _log "port $p is already in use (set S3LAT_GW_PORT / S3LAT_PORT)"; return 1
    fi
  done
  rm -rf "$FSB_ROOT/backend/s3gw-meta.db"* "$S3GW_DATA" "$S3GW_CACHE"
  mkdir -p "$FSB_ROOT/backend" "$S3GW_CACHE"
  "$JFS" format --storage file --bucket "$S3GW_DATA" --trash-days 0 --no-update \
    "$S3GW_META" "$S3GW_BUCKET" > "$FSB_STATE/s3gw.format.log" 2>&1 ||
    { cat "$FSB_STATE/s3gw.format.log" >&2; return 1; }
  MINIO_ROOT_USER=$S3GW_KEY MINIO_ROOT_PASSWORD=$S3GW_SECRET \
    "$JFS" gateway "$S3GW_META" "127.0.0.1:$S3LAT_GW_PORT" --no-banner --no-usage-report \
    --keep-etag --metrics "127.0.0.1:${S3LAT_METRICS_PORT:-19102}" --cache-dir "$S3GW_CACHE" --backup-meta 0 \
    > "$FSB_STATE/s3gw.log" 2>&1 < /dev/null &
  echo $! > "$S3GW_PID"
  wait_port "$S3LAT_GW_PORT" || { _log "S3 gateway did not start"; tail -n 5 "$FSB_STATE/s3gw.log" >&2; s3gw_stop; return 1; }
  "$S3LAT_ROOT/.venv/bin/python" -m megafs.testing.faultproxy \
    --listen "127.0.0.1:$S3GW_PORT" --upstream "http://127.0.0.1:$S3LAT_GW_PORT" \
    --latency "$S3LAT_LATENCY" > "$FSB_STATE/s3lat-proxy.log" 2>&1 < /dev/null &
  echo $! > "$S3LAT_PROXY_PID"
  wait_port "$S3GW_PORT" || { _log "fault proxy did not start"; cat "$FSB_STATE/s3lat-proxy.log" >&2; s3gw_stop; return 1; }
}

s3gw_stop() {
  stop_server "$S3LAT_PROXY_PID"
  stop_server "$S3GW_PID"
  rm -rf "$FSB_ROOT/backend/s3gw-meta.db"* "$S3GW_DATA" "$S3GW_CACHE"
}

s3lat_pids() { cat "$S3GW_PID" "$S3LAT_PROXY_PID" 2>/dev/null; }
