#!/usr/bin/env bash
# shellcheck shell=bash
# Target: the shared rclone-crypt-s3-writes peer (rclone mount of a crypt
# remote over S3, --vfs-cache-mode writes; the shared targets/_rclone.sh),
# but its S3 server is the one of _s3lat.sh: juicefs gateway behind the fault
# proxy that adds S3LAT_LATENCY s (default 0.02) per request, the same as
# megafs-s3 and juicefs-s3-lat get.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "rclone-crypt-s3-lat.sh is a target for the fsbench harness, not a command" >&2
  exit 2
fi
# shellcheck disable=SC2034  # used by the shared _rclone.sh
RC_NAME=rclone-crypt-s3-lat RC_BASE=s3 RC_MODE=writes RC_RCPORT=${RC_RCPORT:-15586}
RCL_HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=scripts/bench-targets/_s3lat.sh
. "$RCL_HERE/_s3lat.sh" || return 1
# shellcheck source=/dev/null
. "$FSBENCH_DIR/targets/_rclone.sh" || return 1
t_pids() { cat "$RC_PID" 2>/dev/null; s3lat_pids; }
