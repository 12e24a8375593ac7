#!/usr/bin/env bash
# shellcheck shell=bash
# Target: JuiceFS with SQLite metadata and the S3 server of _s3lat.sh as its
# object store (juicefs gateway behind the fault proxy, S3LAT_LATENCY s per
# request, the same as megafs-s3 and rclone-crypt-s3-lat get).  Otherwise as
# the shared targets/juicefs-sqlite-file.sh: client-side encryption (RSA key +
# AES-256-GCM per block), --trash-days 0, default mount options.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "juicefs-s3-lat.sh is a target for the fsbench harness, not a command" >&2
  exit 2
fi
JL_HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=scripts/bench-targets/_s3lat.sh
. "$JL_HERE/_s3lat.sh" || return 1
JL_META=sqlite3://$FSB_ROOT/backend/jfs-s3lat-meta.db
JL_BUCKET=$S3GW_URL/$S3GW_BUCKET
JL_CACHE=$FSB_ROOT/cache/jfs-s3lat
JL_KEY=$FSB_STATE/jfs-s3lat-rsa.pem
JL_PID=$FSB_STATE/juicefs-s3lat.pid
JL_LOG=$FSB_STATE/juicefs-s3lat

t_version()  { "$JFS" version; }
t_settings() {
  echo "juicefs format --storage s3 --bucket $JL_BUCKET --access-key $S3GW_KEY --secret-key ... --encrypt-rsa-key KEY.pem (RSA-2048, unencrypted PEM; encrypt-algo aes256gcm-rsa) --trash-days 0 --block-size 4M(default) $JL_META fsbench;"
  echo "juicefs mount $JL_META MNT --cache-dir $JL_CACHE --no-usage-report --backup-meta 0 (foreground; defaults: cache-size 100G, buffer-size 300M, writeback off, prefetch 1, attr/entry/dir-entry cache 1s, max-fuse-io 128K);"
  s3gw_settings
}
t_setup() {
  rm -rf "$FSB_ROOT/backend/jfs-s3lat-meta.db"* "$JL_CACHE"
  mkdir -p "$FSB_ROOT/backend" "$JL_CACHE"
  s3gw_start || return 1
  [ -s "$JL_KEY" ] || openssl genrsa -out "$JL_KEY" 2048 2>/dev/null
  "$JFS" format --storage s3 --bucket "$JL_BUCKET" --access-key "$S3GW_KEY" \
    --secret-key "$S3GW_SECRET" --encrypt-rsa-key "$JL_KEY" --trash-days 0 --no-update \
    "$JL_META" fsbench > "$JL_LOG.format.log" 2>&1 < /dev/null ||
    { cat "$JL_LOG.format.log" >&2; s3gw_stop; return 1; }
}
t_mount() {
  mkdir -p "$1"
  "$JFS" mount "$JL_META" "$1" --cache-dir "$JL_CACHE" --no-usage-report \
    --backup-meta 0 > "$JL_LOG.mount.log" 2>&1 < /dev/null &
  echo $! > "$JL_PID"
  wait_mounted "$1" "$(cat "$JL_PID")"
}
t_umount()      { fuse_umount "$1" "$JL_PID"; }
t_clear_cache() { rm -rf "$JL_CACHE"; mkdir -p "$JL_CACHE"; }
t_pids()        { cat "$JL_PID" 2>/dev/null; s3lat_pids; }
t_teardown() {
  s3gw_stop
  rm -rf "$FSB_ROOT/backend/jfs-s3lat-meta.db"* "$JL_CACHE" "$JL_KEY"
}
