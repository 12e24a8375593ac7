#!/usr/bin/env bash
# shellcheck shell=bash
# Target: megafs on an S3 bucket (fsbench target script), behind the shared
# latency setup of _s3lat.sh: juicefs gateway on 127.0.0.1 with the project's
# fault proxy in front (S3LAT_LATENCY s per request, default 0.02).
#
#   scripts/bench megafs-s3 rclone-crypt-s3-lat juicefs-s3-lat
#
# Everything else is megafs-local.sh (mount/umount/settle/cache handling),
# with the store s3://fsbenchs3/megafs, the endpoint in MEGAFS_S3_ENDPOINT and
# the gateway's credentials in AWS_* (exported for the megafs processes).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "megafs-s3.sh is a target for the fsbench harness, not a command (scripts/bench megafs-s3)" >&2
  exit 2
fi
MF_S3_HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=scripts/bench-targets/_s3lat.sh
. "$MF_S3_HERE/_s3lat.sh" || return 1
# shellcheck source=scripts/bench-targets/megafs-local.sh
. "$MF_S3_HERE/megafs-local.sh" || return 1

MF_NAME=megafs-s3
MF_STORE=s3://$S3GW_BUCKET/megafs
MF_PID=$FSB_STATE/$MF_NAME.pid
MF_LOG=$FSB_STATE/$MF_NAME.log
export MEGAFS_S3_ENDPOINT=$S3GW_URL AWS_ACCESS_KEY_ID=$S3GW_KEY \
  AWS_SECRET_ACCESS_KEY=$S3GW_SECRET AWS_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN

s3lat_copy_fn t_settings mf_local_settings
s3lat_copy_fn t_version mf_local_version
t_settings() {
  mf_local_settings | sed "s| (local directory store;| (S3 store, see below;|"
  echo "store: $MF_STORE, MEGAFS_S3_ENDPOINT=$S3GW_URL (path-style), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the gateway;"
  s3gw_settings
}
t_version() { mf_local_version; "$JFS" version; }

t_setup() {
  [ -x "$MEGAFS_BIN" ] || { _log "megafs not found at $MEGAFS_BIN (set MEGAFS_BIN)"; return 1; }
  rm -rf "$MF_CACHE"
  : > "$MF_LOG"
  s3gw_start || return 1
  mf init "$MF_STORE" >> "$MF_LOG" 2>&1 || { _log "megafs init failed"; mf_logtail; s3gw_stop; return 1; }
  mf_can_wait_idle
  return 0
}
t_pids()     { cat "$MF_PID" 2>/dev/null; s3lat_pids; }
t_teardown() { s3gw_stop; rm -rf "$MF_CACHE"; }
