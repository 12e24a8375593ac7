#!/usr/bin/env bash
# shellcheck shell=bash
# Target: megafs over a local directory store (fsbench target script).
#
# Sourced by the shared harness:
#   fsbench.sh -t scripts/bench-targets/megafs-local.sh MOUNTDIR megafs-local
# (scripts/bench does this for you).  Conventions as in the shared
# targets/*.sh: state under $FSB_STATE, daemon PID in a pid file there.
#
# Env:
#   FSBENCH_DIR  shared bench dir (default: ../../../shared/bench relative to
#                this file's real location, i.e. /work/shared/bench)
#   MEGAFS_BIN   megafs executable (default: <project>/.venv/bin/megafs)
#   MEGAFS_MOUNT_OPTS  extra -o options, e.g. store_latency=0.02,store_bandwidth=50M
#
# Volume: megafs init $FSB_ROOT/backend/megafs-local (fixed bench passphrase
# in MEGAFS_PASSPHRASE), cache: $FSB_STATE/cache (-o cache_dir=, emptied by
# t_clear_cache for the "cold" metrics).  All names are MF_-prefixed: this
# file is sourced into fsbench.sh's namespace.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "megafs-local.sh is a target for the fsbench harness, not a command:" >&2
  echo "  fsbench.sh -t $0 /tmp/fsbench/mnt/megafs-local megafs-local   (or: scripts/bench megafs-local)" >&2
  exit 2
fi

MF_HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
MF_ROOT=$(cd "$MF_HERE/../.." && pwd)
FSBENCH_DIR=${FSBENCH_DIR:-$MF_HERE/../../../shared/bench}
# shellcheck source=/dev/null
. "$FSBENCH_DIR/targets/_common.sh" || return 1
: "${FSB_ROOT:?}" "${FSB_STATE:?}"   # set by _common.sh

MEGAFS_BIN=${MEGAFS_BIN:-$MF_ROOT/.venv/bin/megafs}
MF_NAME=megafs-local
MF_STORE=$FSB_ROOT/backend/$MF_NAME
MF_CACHE=$FSB_STATE/cache
MF_PID=$FSB_STATE/$MF_NAME.pid
MF_LOG=$FSB_STATE/$MF_NAME.log          # daemon + init/umount/status output
MF_PASS=fsbench-not-a-secret            # bench-only volume passphrase
MF_TMO=${FSBENCH_TIMEOUT:-900}          # guard for umount (flush) / settle
MF_EXIT_TMO=300                         # wait for the daemon after umount

mf() { MEGAFS_PASSPHRASE=$MF_PASS "$MEGAFS_BIN" "$@" < /dev/null; }
mf_logtail() { _log "last lines of $MF_LOG:"; tail -n 15 "$MF_LOG" >&2; }

# Does this megafs have `status MNT --wait-idle`?  Probed once per shell
# (help text), so settle does not pay a Python start-up for a command that
# does not exist.  MF_WAIT_IDLE=0/1 in the env skips the probe.
mf_can_wait_idle() {
  if [ -z "${MF_WAIT_IDLE:-}" ]; then
    if mf status --help 2>/dev/null | grep -q -- '--wait-idle'; then
      MF_WAIT_IDLE=1
    else
      MF_WAIT_IDLE=0
    fi
  fi
  [ "$MF_WAIT_IDLE" = 1 ]
}

t_version() {
  local py
  py=$(dirname "$MEGAFS_BIN")/python
  [ -x "$py" ] || py=python3
  mf --version 2>/dev/null ||
    echo "megafs $("$py" -c 'import importlib.metadata as m; print(m.version("megafs"))' 2>/dev/null || echo '?')"
  echo "git $(git -C "$MF_ROOT" describe --always --dirty 2>/dev/null || echo '(no commit)')"
  "$py" --version 2>&1
}

t_settings() {
  echo "megafs init $MF_STORE (local directory store; MEGAFS_PASSPHRASE fixed bench passphrase);"
  echo "mount: $MEGAFS_BIN mount $MF_STORE MNT --foreground -o cache_dir=$MF_CACHE${MEGAFS_MOUNT_OPTS:+,$MEGAFS_MOUNT_OPTS} (other options default);"
  echo "umount: megafs umount MNT (flushes to the store), fallback fusermount3 -u;"
  if mf_can_wait_idle; then
    echo "settle: megafs status MNT --wait-idle (includes CLI start-up)"
  else
    echo "settle: none (this megafs has no 'status --wait-idle'; uploads happen on close/fsync, settle = 0)"
  fi
}

t_setup() {
  [ -x "$MEGAFS_BIN" ] || { _log "megafs not found at $MEGAFS_BIN (set MEGAFS_BIN)"; return 1; }
  rm -rf "$MF_STORE" "$MF_CACHE"
  mkdir -p "$MF_STORE"
  : > "$MF_LOG"
  # Try an existing empty directory first; if init insists on creating
  # STORE itself, retry without it.
  if ! mf init "$MF_STORE" >> "$MF_LOG" 2>&1; then
    rmdir "$MF_STORE" 2>/dev/null
    mf init "$MF_STORE" >> "$MF_LOG" 2>&1 || { _log "megafs init failed"; mf_logtail; return 1; }
  fi
  mf_can_wait_idle
  return 0
}

t_mount() {
  local mnt=$1 pid
  mkdir -p "$mnt" "$MF_CACHE"
  echo "--- $(date +%T) mount $mnt" >> "$MF_LOG"
  MEGAFS_PASSPHRASE=$MF_PASS "$MEGAFS_BIN" mount "$MF_STORE" "$mnt" --foreground \
    -o "cache_dir=$MF_CACHE${MEGAFS_MOUNT_OPTS:+,$MEGAFS_MOUNT_OPTS}" >> "$MF_LOG" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$MF_PID"
  if ! wait_mounted "$mnt" "$pid"; then
    mf_logtail
    if kill -0 "$pid" 2>/dev/null; then   # hung daemon: do not leave it behind
      mountpoint -q "$mnt" && fusermount3 -uz "$mnt"
      kill -TERM "$pid" 2>/dev/null; wait_pid_exit "$pid" 10
    fi
    rm -f "$MF_PID"
    return 1
  fi
}

# The daemon's peak resident size so far in KiB (VmHWM; empty once it has exited).
mf_peak_kib() { [ -n "$1" ] && awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null || true; }

t_umount() {
  local mnt=$1 pid="" rc before after
  [ -f "$MF_PID" ] && pid=$(cat "$MF_PID")
  if mountpoint -q "$mnt"; then
    before=$(mf_peak_kib "$pid")
    echo "--- $(date +%T) umount $mnt" >> "$MF_LOG"
    timeout -k 10 "$MF_TMO" "$MEGAFS_BIN" umount "$mnt" >> "$MF_LOG" 2>&1 < /dev/null
    rc=$?
    after=$(mf_peak_kib "$pid")  # (the peak only grows: after the final drain if still there)
    after=${after:-$before}
    [ -z "$after" ] || _log "$MF_NAME: daemon peak RSS this mount $((after / 1024)) MiB"
    if [ "$rc" -ne 0 ] || mountpoint -q "$mnt"; then
      _log "megafs umount $mnt failed (rc=$rc): falling back to fusermount3"
      mf_logtail
      fuse_umount "$mnt" "$MF_PID"
    fi
  fi
  wait_pid_exit "$pid" "$MF_EXIT_TMO"
  rm -f "$MF_PID"
  ! mountpoint -q "$mnt"
}

# Block until write-back reached the store.  This megafs version uploads on
# close/fsync, so without `status --wait-idle` there is nothing to wait for.
t_settle() {
  mf_can_wait_idle || return 0
  timeout -k 10 "$MF_TMO" "$MEGAFS_BIN" status "$1" --wait-idle >> "$MF_LOG" 2>&1 < /dev/null ||
    _log "megafs status $1 --wait-idle failed (rc=$?); settle time not meaningful"
  return 0
}

t_clear_cache() { rm -rf "$MF_CACHE"; }
t_pids()        { cat "$MF_PID" 2>/dev/null; }
t_teardown()    { rm -rf "$MF_STORE" "$MF_CACHE"; }
