"""A MEGA account (the emulator) through the SDK and the file commands, without FUSE:
``open_drive("mega://EMAIL", mega_password=...)``, and ``megafs ls/put/get/cat/mv/rm/mkdir``
on ``mega://EMAIL:/PATH``. What they write is checked from another MEGA client (the
server's view), what they read was written by one."""

from __future__ import annotations

import errno
import filecmp
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import MEGAFS, PASSPHRASE, by_name, make_volume

import megafs.sdk
import megafs.sdk.sync
from megafs.config import UsageError
from megafs.mega.errors import MegaError
from megafs.stack import OpenError
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import EmulatorProcess

EMAIL, PASSWORD = "alice@example.com", "alice-Passw0rd"
URL = f"mega://{EMAIL}"
MiB = 1 << 20


@pytest.fixture
def api_url(emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """The emulator is the MEGA API for this process (and its children)."""
    monkeypatch.setenv("MEGAFS_MEGA_API_URL", emulator.url)
    monkeypatch.delenv("MEGA_PASSWORD", raising=False)
    return emulator.url


def node_at(client: EmuClient, path: str) -> dict[str, Any]:
    handle = client.root()
    node: dict[str, Any] = {}
    for part in path.strip("/").split("/"):
        node = by_name(client, handle)[part]
        handle = node["h"]
    return node


def on_mega(tmp_path: Path, fn: Callable[[megafs.sdk.Drive], Awaitable[Any]], **kw: Any) -> Any:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("mega_password", PASSWORD)

    async def main() -> Any:
        async with megafs.sdk.open_drive(URL, **kw) as drive:
            return await fn(drive)

    return trio.run(main)


def test_write_read_list_rename_remove_round_trip(
    api_url: str, emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    files = {f"f{n}.bin": random.Random(n).randbytes(n) for n in (0, 1, 131073, 3 * MiB + 7)}

    async def write(d: megafs.sdk.Drive) -> None:
        await d.mkdir("docs/deep", parents=True)
        for name, data in files.items():
            async with await d.open(f"docs/deep/{name}", "wb") as f:
                for i in range(0, len(data), MiB):
                    await f.write(data[i : i + MiB])
        await d.write_bytes("notes.txt", b"hello, MEGA\n")
        assert await d.read_bytes("notes.txt") == b"hello, MEGA\n"  # staged, not uploaded
        async with await d.open("notes.txt", "ab") as f:
            await f.write(b"again\n")
        await d.sync(remote=True)  # on MEGA before the drive closes
        server = by_name(client, client.root())
        assert set(server) == {"docs", "notes.txt"}
        assert client.download(server["notes.txt"]) == b"hello, MEGA\nagain\n"
        await d.write_bytes("later.txt", b"uploaded when the drive closes")

    on_mega(tmp_path, write)
    deep = by_name(client, node_at(client, "docs/deep")["h"])
    assert {name: client.download(node) for name, node in deep.items()} == files
    assert client.download(node_at(client, "later.txt")) == b"uploaded when the drive closes"
    logins = emulator.stats().get("cs:us", 0)

    async def read_and_change(d: megafs.sdk.Drive) -> None:
        assert sorted(await d.listdir()) == ["docs", "later.txt", "notes.txt"]
        entries = {e.name: e for e in await d.scandir("docs/deep")}
        assert {n: e.stat.st_size for n, e in entries.items()} == {
            n: len(v) for n, v in files.items()
        }
        assert all(e.is_file() for e in entries.values())
        assert (await d.stat("docs")).st_mode & 0o170000 == 0o040000
        for name, data in files.items():
            assert await d.read_bytes(f"docs/deep/{name}") == data
        async with await d.open("docs/deep/f131073.bin") as f:
            await f.seek(131072 - 5)
            assert await f.read(10) == files["f131073.bin"][131067:131077]
        await d.rename("docs/deep/f1.bin", "moved.bin")  # across folders
        await d.rename("notes.txt", "later.txt")  # over an existing file
        await d.rename("docs", "papers")
        assert not await d.exists("docs")
        await d.remove("papers/deep/f0.bin")
        with pytest.raises(OSError) as info:
            await d.rmdir("papers/deep")
        assert info.value.errno == errno.ENOTEMPTY
        await d.rmtree("papers/deep")
        with pytest.raises(FileNotFoundError):
            await d.stat("papers/deep")
        with pytest.raises(PermissionError):
            await d.symlink("moved.bin", "a-link")  # MEGA keeps no symbolic links
        for path, _dirs, names in [item async for item in d.walk()]:
            assert path in ("/", "/papers") and set(names) <= {"moved.bin", "later.txt"}

    # The same cache directory: the cached session is resumed, no second login.
    on_mega(tmp_path, read_and_change)
    assert emulator.stats().get("cs:us", 0) == logins
    top = by_name(client, client.root())
    assert set(top) == {"papers", "moved.bin", "later.txt"}
    assert client.download(top["later.txt"]) == b"hello, MEGA\nagain\n"
    assert client.download(top["moved.bin"]) == files["f1.bin"]
    assert by_name(client, top["papers"]["h"]) == {}

    # Another machine (an empty cache) reads it all from MEGA.
    async def fresh(d: megafs.sdk.Drive) -> None:
        assert await d.read_bytes("moved.bin") == files["f1.bin"]
        assert await d.listdir("papers") == []

    on_mega(tmp_path, fresh, cache_dir=tmp_path / "elsewhere", read_only=True)


def test_transfers_and_remote_changes(api_url: str, client: EmuClient, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a" * 1000)
    (src / "sub" / "b.bin").write_bytes(random.Random(5).randbytes(2 * MiB + 1))
    os.utime(src / "a.txt", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    seen: list[tuple[int, int]] = []

    async def go(d: megafs.sdk.Drive) -> None:
        stats = await d.upload(src, "up", progress=lambda done, total: seen.append((done, total)))
        assert (stats.files, stats.directories, stats.bytes) == (2, 2, 1000 + 2 * MiB + 1)
        assert (await d.stat("up/a.txt")).st_mtime == 1_600_000_000
        await d.download("up", tmp_path / "back")
        # A change by another client shows in the open drive (the event channel).
        client.upload(client.root(), "from-phone.txt", b"sent from elsewhere")
        deadline = time.monotonic() + 15
        while "from-phone.txt" not in await d.listdir():
            assert time.monotonic() < deadline, "the remote change did not arrive"
            await trio.sleep(0.1)
        assert await d.read_bytes("from-phone.txt") == b"sent from elsewhere"

    on_mega(tmp_path, go)
    assert seen[-1] == (1000 + 2 * MiB + 1, 1000 + 2 * MiB + 1)
    assert filecmp.cmp(src / "sub" / "b.bin", tmp_path / "back" / "sub" / "b.bin", False)
    assert (tmp_path / "back" / "a.txt").read_bytes() == b"a" * 1000
    assert os.stat(tmp_path / "back" / "a.txt").st_mtime == 1_600_000_000
    assert client.download(node_at(client, "up/sub/b.bin")) == (src / "sub" / "b.bin").read_bytes()


def test_an_upload_that_fails_stays_staged_for_the_next_opening(
    api_url: str, emulator: EmulatorProcess, client: EmuClient, tmp_path: Path
) -> None:
    data = random.Random(4).randbytes(5000)
    emulator.set_quota(1000, EMAIL)

    async def over_quota(d: megafs.sdk.Drive) -> None:
        with pytest.raises(OSError) as info:
            await d.write_bytes("big.bin", data)  # refused at close: it does not fit
        assert info.value.errno == errno.EDQUOT
        assert await d.read_bytes("big.bin") == data  # staged, readable

    on_mega(tmp_path, over_quota)  # leaving tries once more, logs the failure, no error
    assert "big.bin" not in by_name(client, client.root())
    emulator.set_quota(1 << 30, EMAIL)
    assert on_mega(tmp_path, lambda d: d.listdir()) == ["big.bin"]
    assert client.download(by_name(client, client.root())["big.bin"]) == data


def test_sync_wrapper(api_url: str, client: EmuClient, tmp_path: Path) -> None:
    with megafs.sdk.sync.open_drive(URL, mega_password=PASSWORD, cache_dir=tmp_path / "cache") as d:
        st = d.statvfs()  # the account's quota
        assert st.f_blocks > 0 and 0 <= st.f_bavail <= st.f_blocks and st.f_namemax == 255
        d.mkdir("a/b", parents=True)
        d.write_bytes("a/b/f.txt", b"through the blocking API")
        with d.open("a/b/f.txt", "rb") as f:
            f.seek(8)
            assert f.read(3) == b"the"
        d.sync(remote=True)
        assert client.download(node_at(client, "a/b/f.txt")) == b"through the blocking API"
        d.rename("a/b/f.txt", "a/g.txt")
        assert [(p, sorted(n)) for p, _, n in d.walk("a")] == [("/a", ["g.txt"]), ("/a/b", [])]
    assert set(by_name(client, node_at(client, "a")["h"])) == {"b", "g.txt"}


def test_opening_errors(api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"mega_password= or \$MEGA_PASSWORD"):
        on_mega(tmp_path, lambda d: d.listdir(), mega_password=None)
    with pytest.raises(UsageError, match="not a volume passphrase"):
        on_mega(tmp_path, lambda d: d.listdir(), passphrase="x")
    with pytest.raises(UsageError, match="mega_password= is for MEGA accounts"):
        trio.run(lambda: megafs.sdk.open_drive("/srv/vol", mega_password="x").__aenter__())
    with pytest.raises(UsageError, match="opens at the account's root"):
        trio.run(lambda: megafs.sdk.open_drive(URL + "/Docs", mega_password="x").__aenter__())
    with pytest.raises(MegaError):
        on_mega(tmp_path, lambda d: d.listdir(), mega_password="not-the-password")

    monkeypatch.setenv("MEGA_PASSWORD", PASSWORD)
    assert on_mega(tmp_path, lambda d: d.listdir(), mega_password=None) == []

    async def refused(d: megafs.sdk.Drive) -> None:
        assert d.read_only
        with pytest.raises(OSError) as info:
            await d.write_bytes("f", b"")
        assert info.value.errno == errno.EROFS
        # One process at a time has the account's local state (as a mount does).
        with pytest.raises(OpenError, match="in use by megafs process"):
            async with megafs.sdk.open_drive(URL, cache_dir=tmp_path / "cache"):
                pass

    on_mega(tmp_path, refused, read_only=True)


# ------------------------------------------------------------------ file commands


def megafs_cmd(
    *args: str | Path, cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(
        [*MEGAFS, *map(str, args)], cwd=cwd, env=env, capture_output=True, timeout=300
    )
    if check:
        assert res.returncode == 0, res.stderr.decode()
        assert res.stderr == b"", res.stderr.decode()
    return res


def test_file_commands_on_a_mega_account(api_url: str, client: EmuClient, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MEGAFS_PASSPHRASE": PASSWORD,  # the MEGA password, as for megafs mount mega://
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_bytes(b"hello\n")
    (src / "big.bin").write_bytes(random.Random(9).randbytes(MiB + 3))

    def run(*args: str | Path) -> bytes:
        return megafs_cmd(*args, cwd=tmp_path, env=env).stdout

    run("mkdir", f"{URL}:/Docs")
    run("put", "-r", "src", f"{URL}:/Docs")  # into the folder, as cp -r
    assert run("ls", f"{URL}:/Docs/src") == b"big.bin\nhello.txt\n"
    assert run("cat", f"{URL}:/Docs/src/hello.txt") == b"hello\n"
    long = run("ls", "-l", f"{URL}:/Docs/src").decode().splitlines()
    assert long[0].startswith("-") and f" {MiB + 3} " in long[0] and long[0].endswith("big.bin")
    assert run("ls", "-R", URL).decode().startswith("/:\nDocs\n\n/Docs:\nsrc\n")
    run("get", f"{URL}:/Docs/src/big.bin", "copy.bin")
    assert filecmp.cmp(src / "big.bin", tmp_path / "copy.bin", False)
    run("get", "-r", f"{URL}:/Docs", "docs-back")
    assert (tmp_path / "docs-back" / "src" / "hello.txt").read_bytes() == b"hello\n"
    run("mv", f"{URL}:/Docs/src/hello.txt", f"{URL}:/")
    run("rm", "-r", f"{URL}:/Docs/src")
    # What MEGA holds, as another client sees it.
    top = by_name(client, client.root())
    assert set(top) == {"Docs", "hello.txt"}
    assert client.download(top["hello.txt"]) == b"hello\n"
    assert by_name(client, top["Docs"]["h"]) == {}

    link = run("link", f"{URL}:/hello.txt").decode().strip()
    assert link.startswith("https://mega.nz/file/"), link

    bad = megafs_cmd("cat", f"{URL}:/nope", cwd=tmp_path, env=env, check=False)
    lines = bad.stderr.decode().splitlines()
    assert bad.returncode != 0 and lines == [f"megafs: {URL}:/nope: No such file or directory"]
    bad = megafs_cmd("ls", "--key-file", "k", URL, cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.decode().splitlines() == [
        "megafs: a MEGA account opens with its password, not a key file"
    ]


def test_link_on_a_volume_says_links_need_mega(tmp_path: Path) -> None:
    make_volume(tmp_path / "vol")
    env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE, "XDG_CACHE_HOME": str(tmp_path)}
    for arg in ("vol", "vol:/a.txt", "s3://bucket/prefix:/a.txt", "file:///srv/vol:/x"):
        res = megafs_cmd("link", arg, cwd=tmp_path, env=env, check=False)
        lines = res.stderr.decode().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (arg, res.stderr)
        assert lines[0].startswith(f"megafs: {arg}: public links need MEGA"), lines
