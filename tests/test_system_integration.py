"""fstab and systemd integration, for real: ``mount --fstab`` with both fstab types (through
/sbin/mount.megafs and through /sbin/mount.fuse3), ``umount``, the options reaching the
daemon, the daemon's error reaching mount's exit status, ``systemd-analyze verify`` on
every unit in systemd/, the example fstab through systemd's own fstab generator, and the
sd_notify messages of ``megafs mount --foreground`` on a socket the test listens on.

The fstab types ``megafs`` and ``fuse.megafs`` run the commands scripts/setup links
(/usr/sbin/mount.megafs, /usr/local/bin/megafs): mount(8) resets PATH for its helpers, so
no test can point it elsewhere. The tests check that those links lead to this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MEGAFS, PASSPHRASE, Listener, needs_fuse

from megafs import mounthelper, sdnotify
from megafs.config import UsageError, parse_options
from megafs.control import mounted_at
from megafs.mount import status_line

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"
UNITS = REPO / "systemd"


# ---------------------------------------------------------------- helpers


def init_volume(tmp_path: Path, name: str = "store") -> tuple[Path, Path]:
    """A volume made the user's way (``megafs init --passphrase-file``): (store, file)."""
    store = tmp_path / name
    pf = tmp_path / f"{name}.passphrase"
    pf.write_text(PASSPHRASE + "\n")
    pf.chmod(0o600)
    res = run([*MEGAFS, "init", str(store), "--passphrase-file", str(pf)])
    assert res.returncode == 0, res.stderr
    return store, pf


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MEGAFS_PASSPHRASE", "NOTIFY_SOCKET")}
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**clean, **(env or {})},
        timeout=90,
    )


def mountinfo(path: Path) -> tuple[str, str, str] | None:
    """(fstype, source, super options) of the mount at ``path``, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == target:
                fstype, source, options = right.split()
                return fstype, source, options
    return None


def processes_naming(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def daemon_pid(mnt: Path) -> int:
    return int(os.getxattr(mnt, "user.megafs.pid"))


def force_unmount(mnt: Path) -> None:
    if mounted_at(mnt):
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    if mounted_at(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def umount_and_wait(mnt: Path) -> None:
    """``umount`` as a user types it, then wait until the daemon has made its final
    commit and exited (it keeps running for that after the kernel lets go)."""
    pid = daemon_pid(mnt)
    res = run(["umount", str(mnt)])
    assert res.returncode == 0, res.stderr
    assert not mounted_at(mnt)
    wait_for(lambda: pid_gone(pid), 30, f"megafs daemon {pid} to exit")


def status(mnt: Path) -> dict[str, object]:
    res = run([*MEGAFS, "status", "--json", str(mnt)])
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def require_setup_link(name: str, command: str) -> None:
    """``name`` (installed by scripts/setup) must run this checkout's ``command``."""
    want = os.path.realpath(VENV_BIN / command)
    got = os.path.realpath(name)
    assert got == want, f"{name} leads to {got}, not {want}: run scripts/setup in {REPO}"


def dotless_megafs(tmp_path: Path) -> Path:
    """This checkout's megafs at a path with no dot, for the type ``fuse./abs/path``:
    libmount cuts a type at its last dot to find the helper (mount.fuse), so a path with
    a dot of its own (``.venv``) would make it look for /sbin/mount.fuse./some/."""
    link = tmp_path / "bin" / "megafs"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(VENV_BIN / "megafs")
    assert "." not in str(link), f"{link} has a dot: mount(8) would not find mount.fuse"
    return link


# ---------------------------------------------------------------- fstab and mount -t


@needs_fuse
@pytest.mark.parametrize("how", ["fuse.megafs", "megafs", "fuse./abs/path", "mount.fuse3"])
def test_mount_the_fstab_way(tmp_path: Path, how: str) -> None:
    """Each way in mounts, serves reads and writes, honours the options (cache_size=,
    fsname=) and drops the fstab/systemd ones; ``umount`` commits what was written."""
    store, pf = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    fsname = f"megafs-test-{uuid.uuid4().hex[:8]}"
    opts = (
        f"_netdev,nofail,noauto,x-systemd.idle-timeout=30,x-systemd.automount,defaults,"
        f"cache_dir={cache},cache_size=48M,fsname={fsname}"
    )
    env: dict[str, str] = {}
    if how == "megafs":
        # The passphrase as a systemd credential, as a .mount unit's LoadCredential= gives it.
        creds = tmp_path / "credentials"
        creds.mkdir(mode=0o700)
        shutil.copy(pf, creds / "megafs-passphrase")
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    else:
        opts += f",passphrase_file={pf}"

    if how in ("fuse.megafs", "megafs"):
        require_setup_link(
            "/usr/local/bin/megafs" if how == "fuse.megafs" else "/sbin/mount.megafs",
            "megafs" if how == "fuse.megafs" else "mount.megafs",
        )
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{store}  {mnt}  {how}  {opts}  0  0\n")
        cmd = ["mount", "--fstab", str(fstab), str(mnt)]
    elif how == "fuse./abs/path":
        # By hand, with the program's full path in the type: no PATH involved.
        cmd = ["mount", "-t", f"fuse.{dotless_megafs(tmp_path)}", str(store), str(mnt), "-o", opts]
    else:
        # mount.fuse3 itself, as mount(8) runs it; it passes x-* options on, megafs drops them.
        cmd = ["/sbin/mount.fuse3", str(store), str(mnt), "-t", "fuse.megafs", "-o", opts]
        env["PATH"] = f"{VENV_BIN}:{os.environ['PATH']}"

    try:
        res = run(cmd, env)
        assert res.returncode == 0, res.stderr
        assert mounted_at(mnt), "mount returned before the mount was live"
        fstype, source, _ = mountinfo(mnt) or ("", "", "")
        assert (fstype, source) == ("fuse.megafs", fsname)
        assert status(mnt)["cache_max_bytes"] == 48 << 20
        (mnt / "hello.txt").write_text(f"written through {how}\n")
        assert (mnt / "hello.txt").read_text() == f"written through {how}\n"
        umount_and_wait(mnt)

        # The change is on the store: mount it again (the ordinary way) and read it back.
        res = run([*MEGAFS, "mount", str(store), str(mnt), "-o", f"{opts},passphrase_file={pf}"])
        assert res.returncode == 0, res.stderr
        assert (mnt / "hello.txt").read_text() == f"written through {how}\n"
        umount_and_wait(mnt)
    finally:
        force_unmount(mnt)


@needs_fuse
@pytest.mark.parametrize("fstype", ["megafs", "fuse.megafs"])
def test_wrong_passphrase_file_fails_the_mount(tmp_path: Path, fstype: str) -> None:
    """The daemon's one-line error comes out of mount(8), with a non-zero status, and
    nothing stays mounted or running."""
    store, _ = init_volume(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{store} {mnt} {fstype} _netdev,passphrase_file={wrong},cache_dir={tmp_path / 'c'} 0 0\n"
    )
    try:
        res = run(["mount", "--fstab", str(fstab), str(mnt)])
        assert res.returncode != 0
        assert "megafs: wrong passphrase for this volume" in res.stderr, res.stderr
        assert not mounted_at(mnt)
        wait_for(lambda: not processes_naming(str(store)), 10, "the failed daemon to exit")

        fstab.write_text(f"{store} {mnt} {fstype} passphrase_file={tmp_path / 'nope'} 0 0\n")
        res = run(["mount", "--fstab", str(fstab), str(mnt)])
        assert res.returncode != 0
        assert "cannot read passphrase file" in res.stderr, res.stderr
        assert not mounted_at(mnt)
    finally:
        force_unmount(mnt)


@needs_fuse
def test_passphrase_never_in_the_options(tmp_path: Path) -> None:
    store, _ = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    secret = "s3cret-" + uuid.uuid4().hex
    try:
        res = run(["mount", "-t", "megafs", str(store), str(mnt), "-o", f"passphrase={secret}"])
        assert res.returncode != 0
        assert "passphrase_file=" in res.stderr and secret not in res.stderr, res.stderr
        assert not mounted_at(mnt)
    finally:
        force_unmount(mnt)


@needs_fuse
def test_mount_waits_a_bounded_time(tmp_path: Path) -> None:
    """A mount that cannot come up in mount_timeout= seconds (here: a store that answers
    after 2 s) fails, and its daemon is stopped rather than mounting later."""
    store, pf = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"passphrase_file={pf},cache_dir={tmp_path / 'c'},store_latency=2,mount_timeout=0.5"
    try:
        started = time.monotonic()
        res = run(
            ["mount", "-t", f"fuse.{dotless_megafs(tmp_path)}", str(store), str(mnt), "-o", opts]
        )
        assert res.returncode != 0
        assert "did not come up within 0.5 s" in res.stderr, res.stderr
        assert time.monotonic() - started < 15
        assert not processes_naming(str(store))
        time.sleep(2.5)  # past the store's delay: a daemon left running would have mounted
        assert not mounted_at(mnt)
    finally:
        force_unmount(mnt)


def test_options_parsed_the_fstab_way() -> None:
    opts = parse_options(
        [
            "rw,defaults,auto,noauto,user,users,nouser,_netdev,nofail,dev,suid,exec,"
            "x-systemd.automount,x-systemd.idle-timeout=30,X-mount.mkdir,comment=systemd.x,"
            "subtype=other,noexec,fsname=drive"
        ]
    )
    fuse = opts.fuse_options("file:///srv/v")
    assert {"subtype=megafs", "fsname=drive", "noexec"} <= fuse
    assert not {"dev", "suid", "rw", "_netdev", "nofail", "subtype=other"} & fuse
    assert "fsname=file:///srv/v" in parse_options(["ro"]).fuse_options("file:///srv/v")
    with pytest.raises(UsageError, match="mount_timeout must be more than 0 seconds"):
        parse_options(["mount_timeout=0"])
    seconds = parse_options(["upload_delay=0,commit_interval=0.5,dir_cache_time=86400"])
    assert (seconds.upload_delay, seconds.commit_interval, seconds.dir_cache_time) == (
        0,
        0.5,
        86400,
    )
    for bad, why in [
        ("commit_interval=0", "more than 0 and at most 3600"),
        ("upload_delay=-1", "at least 0 and at most 3600"),
        ("dir_cache_time=86401", "at most 86400"),
        ("store_latency=soon", "store_latency=soon: not a number of seconds"),
    ]:
        with pytest.raises(UsageError, match=why):
            parse_options([bad])


def test_mount_fuse3_calling_form() -> None:
    """``megafs STORE MNT -o OPTS`` (how mount.fuse3 runs type fuse.megafs) goes to the
    helper; subcommands never do."""
    assert mounthelper.is_mount_fuse_call(["/srv/v", "/mnt/x", "-o", "rw,dev,suid"])
    assert mounthelper.is_mount_fuse_call(["s3://bucket/p", "/mnt/x", "-o", "rw"])
    assert not mounthelper.is_mount_fuse_call(["mount", "/srv/v", "-o", "rw"])
    assert not mounthelper.is_mount_fuse_call(["status", "/mnt/x"])
    assert not mounthelper.is_mount_fuse_call(["--debug", "/mnt/x", "-o", "rw"])


def test_helper_fake_mount_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # mount -f: everything but the mount itself, i.e. nothing (not even a passphrase).
    assert mounthelper.main(["/srv/v", str(tmp_path), "-f", "-o", "rw"]) == 0
    assert not mounted_at(tmp_path)
    assert mounthelper.main(["only-one-argument"]) == 2
    assert "usage: mount.megafs" in capsys.readouterr().err


# ---------------------------------------------------------------- systemd units


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.rglob("*") if p.suffix in (".service", ".mount", ".automount"))


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: scripts/setup installs it (package systemd)"
    return path


def verify(units: list[Path], *, user: bool, tmp_path: Path) -> None:
    """``systemd-analyze verify``: exit 0 and not a word of warning."""
    env = {}
    cmd = [systemd_analyze(), "verify", "--man=no"]
    if user:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # the user manager wants one
        cmd.insert(1, "--user")
    res = run([*cmd, *map(str, units)], env)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
        units,
        res.stdout,
        res.stderr,
    )


def test_every_unit_verifies(tmp_path: Path) -> None:
    require_setup_link("/usr/local/bin/megafs", "megafs")  # what the units run
    units = unit_files()
    names = {p.relative_to(UNITS).as_posix() for p in units}
    assert {
        "megafs@.service",
        "user/megafs@.service",
        "examples/mnt-megafs.mount",
        "examples/mnt-megafs.automount",
    } <= names
    for unit in units:
        verify([unit], user=unit.parent.name == "user", tmp_path=tmp_path)
    for service in (UNITS / "megafs@.service", UNITS / "user" / "megafs@.service"):
        text = service.read_text()
        assert "\nType=notify\n" in text and "\nExecStop=" in text and "umount" in text
    assert "LoadCredential=megafs-passphrase:" in (UNITS / "megafs@.service").read_text()


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit running a program that does not exist, or with
    a setting systemd ignores, does not pass."""
    good = (UNITS / "megafs@.service").read_text()
    for bad in (
        good.replace("ExecStart=/usr/local/bin/megafs", "ExecStart=/usr/local/bin/megafz"),
        good.replace("Type=notify", "Type=notifyy"),
    ):
        (tmp_path / "megafs@.service").write_text(bad)
        with pytest.raises(AssertionError):
            verify([tmp_path / "megafs@.service"], user=False, tmp_path=tmp_path)


def test_example_fstab_makes_mount_and_automount_units(tmp_path: Path) -> None:
    """systemd's own fstab generator turns systemd/examples/fstab into units that verify;
    the x-systemd.automount line becomes an .automount with the idle timeout."""
    generator = Path("/lib/systemd/system-generators/systemd-fstab-generator")
    assert generator.exists(), "systemd's fstab generator is missing (package systemd)"
    out = [tmp_path / d for d in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    res = run([str(generator), *map(str, out)], {"SYSTEMD_FSTAB": str(UNITS / "examples/fstab")})
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    made = sorted(p.name for p in out[0].glob("*mount"))
    assert made == ["mnt-archive.automount", "mnt-archive.mount", "mnt-megafs.mount"]
    automount = (out[0] / "mnt-archive.automount").read_text()
    assert "TimeoutIdleSec=10min" in automount
    for name in made:
        verify([out[0] / name], user=False, tmp_path=tmp_path)


# ---------------------------------------------------------------- sd_notify


def test_sdnotify_by_hand(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.enabled() and not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.sock.getsockname())
    assert sdnotify.notify("READY=1", "STATUS=idle")
    assert listener.expect(lambda m: True, 5) == "READY=1\nSTATUS=idle"
    # The abstract namespace, as systemd's own socket is: '@' stands for the NUL byte.
    name = f"megafs-test-{uuid.uuid4().hex}"
    abstract = Listener("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert abstract.expect(lambda m: True, 5) == "STOPPING=1"
    finally:
        abstract.close()
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # nobody listens now: no exception
    assert not sdnotify.notify("STATUS=lost")


def test_status_line() -> None:
    assert status_line({"pending_objects": 0, "pending_bytes": 0, "dirty_files": 0}) == "idle"
    line = status_line({"pending_objects": 9, "pending_bytes": 3 << 20, "pending_files": 2})
    assert line == "uploading 2 files, 3.0 MiB (9 objects)"
    line = status_line({"pending_objects": 0, "dirty_files": 1, "last_error": "timeout"})
    assert line == "uploading 1 files, 0.0 MiB (0 objects); last store error: timeout"


@needs_fuse
def test_foreground_mount_notifies_systemd(tmp_path: Path, listener: Listener) -> None:
    """READY=1 once the mount is live, STATUS= with the upload backlog and then idle,
    STOPPING=1 when it unmounts."""
    store, pf = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 8 MiB through a 2 MiB/s link: some seconds of visible backlog.
    opts = f"cache_dir={tmp_path / 'c'},store_bandwidth=2M,commit_interval=0.2"
    cmd = [*MEGAFS, "mount", str(store), str(mnt), "--foreground", "--passphrase-file", str(pf)]
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "-o", opts],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": listener.sock.getsockname()},
    )
    try:
        listener.expect(lambda m: "READY=1" in m.split("\n"), 30)
        assert mounted_at(mnt), "READY=1 came before the mount was live"
        listener.expect(lambda m: m == "STATUS=idle", 10)
        (mnt / "big").write_bytes(os.urandom(8 << 20))
        busy = listener.expect(lambda m: backlog_mib(m) > 0, 15)
        assert re.fullmatch(r"STATUS=uploading \d+ files, \d+\.\d MiB \(\d+ objects\)", busy)
        listener.expect(lambda m: m == "STATUS=idle", 30)
        res = run([*MEGAFS, "umount", str(mnt)])
        assert res.returncode == 0, res.stderr
        listener.expect(lambda m: m == "STOPPING=1", 10)
        assert proc.wait(timeout=30) == 0
        order = [m for _, m in listener.received]
        assert order.index("STOPPING=1") > order.index(busy)
    finally:
        log.close()
        force_unmount(mnt)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    text = (tmp_path / "daemon.log").read_text()
    assert " ERROR " not in text and "Traceback" not in text, text


def backlog_mib(message: str) -> float:
    """The MiB a ``STATUS=uploading ...`` line says are waiting (0 for anything else)."""
    m = re.match(r"STATUS=uploading \d+ files, (\d+\.\d) MiB", message)
    return float(m.group(1)) if m else 0.0
