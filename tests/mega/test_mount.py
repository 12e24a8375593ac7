"""``megafs mount mega://EMAIL``: a MEGA account (the emulator) through a real FUSE mount.

The third-party tests (test_thirdparty.py) check that what megafs writes is what MEGA's own
clients read and the other way round; these check megafs's behaviour as a filesystem: POSIX
operations, where deletions go, duplicate names, sessions across remounts, quota, integrity
failures, crashes during uploads, and the one-line errors a user sees.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MEGAFS, Listener, Mount, by_name, fuse_available, serving

from megafs.mega import crypto
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import EmulatorProcess

EMAIL, PASSWORD = "alice@example.com", "alice-Passw0rd"
EVENT_WAIT = 15.0  # seconds a remote change may take to show in the mount

pytestmark = pytest.mark.skipif(not fuse_available, reason="/dev/fuse is not usable here")


def mega_mount(emulator: EmulatorProcess, tmp: Path, *options: str, pw: str = PASSWORD) -> Mount:
    return Mount(
        f"mega://{EMAIL}",
        tmp / "mnt",
        tmp / "cache",
        tmp / "megafs.log",
        list(options),
        passphrase=pw,
        env={"MEGAFS_MEGA_API_URL": emulator.url},
    )


def wait_for(predicate: Any, timeout: float = EVENT_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_files_and_folders_round_trip(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    sizes = [0, 1, 16, 131072, 131073, 3 * 1024 * 1024 + 7]
    files = {f"f{size}.bin": os.urandom(size) for size in sizes}
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        (m.path / "docs" / "deep").mkdir(parents=True)
        for name, data in files.items():
            (m.path / "docs" / "deep" / name).write_bytes(data)
        (m.path / "naïve café.txt").write_text("unicode names\n")
        (m.path / "cut.bin").write_bytes(b"0123456789")
        os.truncate(m.path / "cut.bin", 4)  # on the path: no open file, no close
        with open(m.path / "appended.log", "ab") as f:
            f.write(b"one\n")
        with open(m.path / "appended.log", "ab") as f:
            f.write(b"two\n")
        assert (m.path / "appended.log").read_bytes() == b"one\ntwo\n"
        st = os.statvfs(m.path)
        assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks
    logins = emulator.stats().get("cs:us", 0)

    # What the server holds is what another client reads.
    root = client.root()
    top = by_name(client, root)
    assert set(top) == {"docs", "naïve café.txt", "appended.log", "cut.bin"}
    assert client.download(top["cut.bin"]) == b"0123"
    deep = by_name(client, by_name(client, top["docs"]["h"])["deep"]["h"])
    assert {name: client.download(node) for name, node in deep.items()} == files

    # A remount resumes the cached session (no second login) and reads it all back.
    with serving(m):
        for name, data in files.items():
            assert (m.path / "docs" / "deep" / name).read_bytes() == data
        assert (m.path / "naïve café.txt").read_text() == "unicode names\n"
        assert os.stat(m.path / "docs" / "deep" / "f131073.bin").st_size == 131073
    assert emulator.stats().get("cs:us", 0) == logins


def test_rename_replace_touch_and_delete(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        (m.path / "a").mkdir()
        (m.path / "b").mkdir()
        (m.path / "a" / "x.txt").write_bytes(b"x" * 1000)
        (m.path / "b" / "y.txt").write_bytes(b"old y")
        # Rename across folders over an existing file, then touch it (the kernel's SETATTR
        # after a rename must not write the old name back).
        os.rename(m.path / "a" / "x.txt", m.path / "b" / "y.txt")
        os.utime(m.path / "b" / "y.txt", (1_600_000_000, 1_600_000_000))
        assert sorted(os.listdir(m.path / "b")) == ["y.txt"]
        assert os.listdir(m.path / "a") == []
        assert (m.path / "b" / "y.txt").read_bytes() == b"x" * 1000
        assert os.stat(m.path / "b" / "y.txt").st_mtime == 1_600_000_000
        with pytest.raises(OSError) as exc:
            os.rmdir(m.path / "b")
        assert exc.value.errno == errno.ENOTEMPTY
        os.rename(m.path / "b", m.path / "a" / "b2")
        # Deleting moves into the Rubbish Bin, remembering where it came from (``rr``).
        os.unlink(m.path / "a" / "b2" / "y.txt")
        os.rmdir(m.path / "a" / "b2")
        assert os.listdir(m.path / "a") == []
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / "b")
    root, rubbish = client.root(), client.root(4)
    assert set(by_name(client, root)) == {"a"}
    a = by_name(client, root)["a"]
    # The file the rename replaced went to the Rubbish Bin too (recoverable, like MEGA's
    # own clients do), so the bin holds two y.txt: the newer one shows under its plain name.
    nodes = [n for n in client.fetch()["f"] if n.get("p") == rubbish]
    assert sorted(client.name_of(n) for n in nodes) == ["b2", "y.txt", "y.txt"]
    binned = by_name(client, rubbish)
    ys = {client.download(n): n for n in nodes if client.name_of(n) == "y.txt"}
    assert sorted(ys) == [b"old y", b"x" * 1000]
    y = ys[b"x" * 1000]
    attrs = crypto.decrypt_attributes(y["a"], crypto.FileKey.unpack(client.node_key(y)).aes_key)
    assert attrs["rr"] == binned["b2"]["h"]  # where it was when deleted
    assert crypto.fingerprint_mtime(attrs["c"]) == 1_600_000_000
    assert by_name(client, a["h"]) == {}
    # The Rubbish Bin can be mounted (read-only), and -o mega_delete=permanent deletes for good.
    bin_mount = mega_mount(emulator, tmp_path / "bin", "mega_root=rubbish")
    with serving(bin_mount):
        listed = sorted(os.listdir(bin_mount.path))
        assert len(listed) == 3 and listed[0] == "b2" and listed[-1] == "y.txt", listed
        assert {(bin_mount.path / n).read_bytes() for n in listed[1:]} == {b"old y", b"x" * 1000}
        with pytest.raises(OSError) as exc:
            (bin_mount.path / "new").write_bytes(b"")
        assert exc.value.errno == errno.EROFS
    perm = mega_mount(emulator, tmp_path / "perm", "mega_delete=permanent")
    with serving(perm):
        (perm.path / "gone.txt").write_bytes(b"bye")
        os.unlink(perm.path / "gone.txt")
    assert "gone.txt" not in by_name(client, rubbish)
    assert "gone.txt" not in by_name(client, root)


def test_duplicate_names_and_remote_changes(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    root = client.root()
    first = client.upload(root, "same.txt", b"first")
    time.sleep(1.1)  # a later creation time: the newest keeps the plain name
    second = client.upload(root, "same.txt", b"second")
    client.upload(root, "a/b", b"slash")  # MEGA names may hold a slash
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        names = sorted(os.listdir(m.path))
        assert names == sorted(["same.txt", f"same ({first['h']}).txt", "a\uff0fb"]), names
        assert (m.path / "same.txt").read_bytes() == b"second"
        assert (m.path / f"same ({first['h']}).txt").read_bytes() == b"first"
        assert (m.path / "a\uff0fb").read_bytes() == b"slash"
        # Another client's changes reach the mount through the event channel.
        client.upload(root, "later.txt", b"from elsewhere")
        client.one({"a": "d", "n": second["h"]})
        wait_for(lambda: "later.txt" in os.listdir(m.path))
        wait_for(lambda: f"same ({first['h']}).txt" not in os.listdir(m.path))
        assert (m.path / "later.txt").read_bytes() == b"from elsewhere"
        assert (m.path / "same.txt").read_bytes() == b"first"


def test_public_link(emulator: EmulatorProcess, client: EmuClient, tmp_path: Path) -> None:
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        (m.path / "share.bin").write_bytes(b"shared bytes")
        out = subprocess.run(
            [*MEGAFS, "link", str(m.path / "share.bin")], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        link = out.stdout.strip()
        again = subprocess.run(
            [*MEGAFS, "link", str(m.path / "share.bin")], capture_output=True, text=True
        )
        assert again.stdout.strip() == link  # the existing link, not a new one
        bad = subprocess.run([*MEGAFS, "link", str(tmp_path)], capture_output=True, text=True)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert link.startswith("https://mega.nz/file/"), link
    handle, _, key = link.removeprefix("https://mega.nz/file/").partition("#")
    node = by_name(client, client.root())["share.bin"]
    assert crypto.b64decode(key) == client.node_key(node)
    assert handle and handle != node["h"]  # a public handle, not the node's
    # Unmounted: the same link, straight from the account.
    direct = subprocess.run(
        [*MEGAFS, "link", f"mega://{EMAIL}/share.bin", "-o", f"cache_dir={m.cache}"],
        capture_output=True,
        text=True,
        env={**os.environ, **m.env, "MEGAFS_PASSPHRASE": PASSWORD},
    )
    assert direct.returncode == 0 and direct.stdout.strip() == link, direct.stderr
    missing = subprocess.run(
        [*MEGAFS, "link", f"mega://{EMAIL}/nope.bin", "-o", f"cache_dir={m.cache}"],
        capture_output=True,
        text=True,
        env={**os.environ, **m.env, "MEGAFS_PASSPHRASE": PASSWORD},
    )
    assert missing.returncode != 0 and "no such file" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("email", "password"),
    [(EMAIL, "not-the-password"), ("nobody@example.com", "not-the-password")],
    ids=["wrong-password", "unknown-account"],
)
def test_wrong_password_is_one_line(
    emulator: EmulatorProcess, tmp_path: Path, email: str, password: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        [*MEGAFS, "mount", f"mega://{email}", str(mnt), "-o", f"cache_dir={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "MEGAFS_PASSPHRASE": password,
            "MEGAFS_MEGA_API_URL": emulator.url,
        },
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MEGA login failed" in lines[0], out.stderr
    assert "not-the-password" not in out.stderr


def test_bad_mac_reads_fail_with_eio(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    data = os.urandom(700_000)
    for name in ("good.bin", "bad.bin"):
        token, key = client.put_data(data)
        if name == "bad.bin":
            key = crypto.FileKey(
                key.aes_key, key.nonce, bytes([key.meta_mac[0] ^ 1]) + key.meta_mac[1:]
            )
        node = {
            "h": crypto.b64encode(token),
            "t": 0,
            "a": crypto.encrypt_attributes({"n": name}, key.aes_key),
            "k": crypto.encrypt_key(client.master_key, key.pack()),
        }
        client.one({"a": "p", "t": client.root(), "n": [node]})
    m = mega_mount(emulator, tmp_path)
    m.start()
    try:
        assert (m.path / "good.bin").read_bytes() == data
        with pytest.raises(OSError) as exc:
            (m.path / "bad.bin").read_bytes()
        assert exc.value.errno == errno.EIO
    finally:
        m.stop()
    assert "MAC mismatch" in m.log_text()


def test_over_quota_keeps_the_file_staged(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    m = mega_mount(emulator, tmp_path)
    emulator.set_quota(1024 * 1024, EMAIL)
    try:
        m.start()
        try:
            with pytest.raises(OSError) as exc:
                with open(m.path / "big.bin", "wb") as f:
                    f.write(data)
            assert exc.value.errno == errno.EDQUOT
            # Nothing is lost: the file reads back from its staged copy and is still listed.
            assert (m.path / "big.bin").read_bytes() == data
            assert "big.bin" not in by_name(client, client.root())
        finally:
            m.stop()
        staged = list((tmp_path / "cache").glob("mega-*/staging/*"))
        assert staged, "the staged copy must survive the unmount"
        assert data not in b"".join(p.read_bytes() for p in staged)  # sealed at rest
    finally:
        emulator.set_quota(1 << 40, EMAIL)
    # The next mount (quota raised) finishes the upload.
    with serving(m):
        wait_for(lambda: "big.bin" in by_name(client, client.root()), timeout=30)
        assert (m.path / "big.bin").read_bytes() == data
    assert client.download(by_name(client, client.root())["big.bin"]) == data


def test_kill_during_upload_resumes_on_next_mount(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    m = mega_mount(emulator, tmp_path)
    m.start()
    emulator.fault("ul", "delay", seconds=60, count=-1)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(m.path / "crash.bin", "wb") as f:
                f.write(data)
        except BaseException as exc:  # the daemon dies under it
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: emulator.stats().get("ul", 0) > 0, timeout=30)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    t.join(timeout=30)
    m.proc = None
    emulator.clear_faults()
    assert "crash.bin" not in by_name(client, client.root())
    with serving(m):
        wait_for(lambda: "crash.bin" in by_name(client, client.root()), timeout=30)
        assert (m.path / "crash.bin").read_bytes() == data
    assert client.download(by_name(client, client.root())["crash.bin"]) == data
    assert not list((tmp_path / "cache").glob("mega-*/staging/*"))


def test_expired_session_logs_in_again_and_logout(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        (m.path / "before.txt").write_bytes(b"1")
        logins = emulator.stats().get("cs:us", 0)
        assert emulator.expire_sessions(EMAIL) >= 1  # e.g. "log out all sessions" elsewhere
        (m.path / "after.txt").write_bytes(b"2")  # uploaded in the background
        wait_for(lambda: emulator.stats().get("cs:us", 0) > logins)
        time.sleep(0.5)
        assert emulator.stats().get("cs:us", 0) == logins + 1  # one login, however many ESIDs
        assert sorted(os.listdir(m.path)) == ["after.txt", "before.txt"]
        # Refused while mounted, with one line.
        busy = subprocess.run(
            [*MEGAFS, "logout", f"mega://{EMAIL}", "-o", f"cache_dir={m.cache}"],
            capture_output=True,
            text=True,
            env={**os.environ, **m.env, "MEGAFS_PASSPHRASE": PASSWORD},
        )
        assert busy.returncode != 0 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    client.login(EMAIL, PASSWORD)  # the other client's session was ended too
    assert {"before.txt", "after.txt"} <= set(by_name(client, client.root()))
    out = subprocess.run(
        [*MEGAFS, "logout", f"mega://{EMAIL}", "-o", f"cache_dir={m.cache}"],
        capture_output=True,
        text=True,
        env={**os.environ, **m.env, "MEGAFS_PASSPHRASE": PASSWORD},
    )
    assert out.returncode == 0 and "logged out" in out.stdout, out.stderr
    assert not list(m.cache.glob("mega-*/session"))
    logins = emulator.stats().get("cs:us", 0)
    with serving(m):
        assert (m.path / "after.txt").read_bytes() == b"2"
    assert emulator.stats().get("cs:us", 0) == logins + 1


def test_undecryptable_node_is_skipped(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    client.upload(client.root(), "fine.txt", b"fine")
    token, key = client.put_data(b"lost")
    wrong = crypto.encrypt_key(os.urandom(16), key.pack())  # wrapped with another master key
    node = {
        "h": crypto.b64encode(token),
        "t": 0,
        "a": crypto.encrypt_attributes({"n": "lost.txt"}, key.aes_key),
        "k": wrong,
    }
    client.one({"a": "p", "t": client.root(), "n": [node]})
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        assert os.listdir(m.path) == ["fine.txt"]
        assert (m.path / "fine.txt").read_bytes() == b"fine"
        status = subprocess.run(
            [*MEGAFS, "status", str(m.path), "--json"], capture_output=True, text=True
        )
        assert '"undecryptable_nodes": 1' in status.stdout, status.stdout
    assert "cannot be decrypted" in m.log_text()


def test_close_does_not_wait_for_the_upload(
    emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    """Closing queues the upload; renames and unlinks during it come out right (the
    editor pattern: write a temporary file, close, rename it over the original)."""
    m = mega_mount(emulator, tmp_path)
    with serving(m):
        (m.path / "doc.txt").write_bytes(b"original")
        wait_for(lambda: "doc.txt" in by_name(client, client.root()))
        emulator.fault("ul", "delay", seconds=2, count=4)
        t0 = time.monotonic()
        (m.path / ".doc.txt.swp").write_bytes(b"edited version")
        (m.path / "scratch").write_bytes(b"short-lived")
        assert time.monotonic() - t0 < 1.5, "close waited for the upload"
        assert os.getxattr(m.path / "scratch", "user.megafs.state") == b"uploading"
        os.rename(m.path / ".doc.txt.swp", m.path / "doc.txt")
        os.unlink(m.path / "scratch")
        assert (m.path / "doc.txt").read_bytes() == b"edited version"
        assert sorted(os.listdir(m.path)) == ["doc.txt"]
        wait_for(lambda: os.getxattr(m.path / "doc.txt", "user.megafs.state") == b"clean")
    # After the unmount (which waits for the uploads) the account holds just that.
    top = by_name(client, client.root())
    assert set(top) == {"doc.txt"}
    assert client.download(top["doc.txt"]) == b"edited version"


def test_systemd_hears_ready_status_and_stopping(
    emulator: EmulatorProcess, tmp_path: Path, listener: Listener
) -> None:
    """A MEGA mount under systemd (Type=notify), like a volume mount: READY=1 once
    live, STATUS= with the upload backlog, STOPPING=1 when it unmounts."""
    m = mega_mount(emulator, tmp_path)
    m.env["NOTIFY_SOCKET"] = listener.sock.getsockname()
    with serving(m):
        listener.expect(lambda msg: "READY=1" in msg.split("\n"), 30)
        listener.expect(lambda msg: msg == "STATUS=idle", 10)
        emulator.fault("ul", "delay", seconds=3, count=2)
        (m.path / "report.pdf").write_bytes(os.urandom(200_000))
        listener.expect(lambda msg: msg.startswith("STATUS=uploading 1 files"), 10)
        listener.expect(lambda msg: msg == "STATUS=idle", 30)
    listener.expect(lambda msg: msg == "STOPPING=1", 10)
