"""Real, unmodified third-party MEGA clients against the emulator and a megafs mount.

megatools 1.11 (Debian) and mega.py 1.0.8 implement MEGA's cryptography independently of
megafs; the emulator never decrypts anything. So every file one of them uploads that megafs
reads byte for byte, and every file megafs writes that they download with their own MAC check,
shows that megafs's keys, attributes, CTR layout and MACs are MEGA's -- and that the emulator
answers in the shapes real clients expect. Each scenario runs with both clients, on a v1 and
a v2 account. How the clients are aimed at the emulator: ``thirdparty.py``.

Client quirks are pinned by their own tests (``test_quirk_*``) rather than skipped silently:
megatools cannot upload an empty file; mega.py crashes on files whose last chunk holds at most
16 bytes (e.g. 131073 bytes) and on downloading an empty file. megatools 1.11 has no rename or
move command, so those run with mega.py only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, serving
from thirdparty import (
    MegaPy,
    Megatools,
    TlsFront,
    require_tools,
    start_thirdparty_emulator,
)

from megafs.mega import crypto
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import EmulatorProcess

MiB = 1 << 20
#: Chunk-boundary sizes around MEGA's first chunk (128 KiB), and a multi-chunk file.
SIZES = [0, 1, 131071, 131072, 131073, 5 * MiB + 4321]
#: Sizes each client cannot upload, with the test that proves why.
UPLOAD_QUIRKS = {
    "megatools": {0: "test_quirk_megatools_cannot_upload_empty_files"},
    "megapy": {131073: "test_quirk_megapy_last_chunk_of_at_most_16_bytes"},
}
#: Sizes each client cannot download, with the test that proves why.
DOWNLOAD_QUIRKS = {
    "megatools": {},
    "megapy": {
        0: "test_quirk_megapy_cannot_download_empty_files",
        131073: "test_quirk_megapy_last_chunk_of_at_most_16_bytes",
    },
}
#: Stand-in for 131073 where mega.py cannot take it: its last chunk is 17 bytes, just past the
#: sizes mega.py's MAC loop gets wrong.
MEGAPY_NEAR_131073 = 131089

ACCOUNTS = {
    1: ("third-v1@example.com", "v1-Third-Party-pw"),
    2: ("third-v2@example.com", "v2-Third-Party-pw"),
}
EVENT_WAIT = 15.0  # seconds a change may take to reach the mount through action packets


@pytest.fixture(scope="module")
def thirdparty_emulator(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmulatorProcess, TlsFront]]:
    require_tools()
    with start_thirdparty_emulator(
        tmp_path_factory.mktemp("thirdparty-emu"),
        accounts={ACCOUNTS[2][0]: ACCOUNTS[2][1]},
        v1_accounts={ACCOUNTS[1][0]: ACCOUNTS[1][1]},
    ) as started:
        yield started


@dataclass
class Scenario:
    emulator: EmulatorProcess
    client: Megatools | MegaPy
    kind: str  # "megatools" or "megapy"
    email: str
    password: str
    tmp: Path

    def mount(self) -> Any:
        """A megafs mount of the account (``with scenario.mount() as m:``)."""
        return mega_mount(self.emulator, self.email, self.password, self.tmp)


def mega_mount(emulator: EmulatorProcess, email: str, password: str, tmp: Path) -> Any:
    """``megafs mount mega://EMAIL`` against the emulator, as a context manager (``serving``
    of tests/conftest.py: afterwards the daemon's log must be free of errors)."""
    m = Mount(
        f"mega://{email}",
        tmp / "mnt",
        tmp / "cache",
        tmp / "megafs.log",
        passphrase=password,
        env={"MEGAFS_MEGA_API_URL": emulator.url},
    )
    return serving(m)


@pytest.fixture(
    params=[("megatools", 1), ("megatools", 2), ("megapy", 1), ("megapy", 2)],
    ids=lambda p: f"{p[0]}-v{p[1]}",
)
def scenario(
    request: pytest.FixtureRequest,
    thirdparty_emulator: tuple[EmulatorProcess, TlsFront],
    tmp_path: Path,
) -> Iterator[Scenario]:
    emulator, front = thirdparty_emulator
    emulator.reset()  # empty trees, no sessions
    kind, version = request.param
    email, password = ACCOUNTS[version]
    client: Megatools | MegaPy
    if kind == "megatools":
        client = Megatools(front, tmp_path / "megatools", email, password)
    else:
        client = MegaPy(emulator, tmp_path / "megapy", email, password)
    yield Scenario(emulator, client, kind, email, password, tmp_path)
    if isinstance(client, MegaPy):
        client.close()


def make_files(directory: Path, sizes: list[int], prefix: str = "f") -> dict[str, bytes]:
    """Random files ``<prefix><size>.bin``; name -> content."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for size in sizes:
        data = os.urandom(size)
        (directory / f"{prefix}{size}.bin").write_bytes(data)
        files[f"{prefix}{size}.bin"] = data
    return files


def sizes_for(kind: str, quirks: dict[str, dict[int, str]]) -> list[int]:
    """SIZES minus the client's quirks (each covered by its own test), plus stand-ins."""
    sizes = [s for s in SIZES if s not in quirks[kind]]
    if kind == "megapy" and 131073 in quirks[kind]:
        sizes.append(MEGAPY_NEAR_131073)
    return sizes


def wait_until(what: str, check: Callable[[], bool], timeout: float = EVENT_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.1)


def tree_of(root: Path) -> dict[str, int | None]:
    """Everything below a mounted directory: relative path -> size (None for folders).
    A file a remote change removes between the listing and its stat is left out (the
    callers poll: the next look sees the new state)."""
    listing: dict[str, int | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            listing[str(rel / d)] = None
        for f in filenames:
            try:
                listing[str(rel / f)] = os.stat(Path(dirpath) / f).st_size
            except FileNotFoundError:
                continue
    return listing


# --------------------------------------------------------------------------- content


def test_client_upload_read_through_mount(scenario: Scenario) -> None:
    """Files the client uploads (its keys, MACs, attributes) read back byte for byte."""
    sizes = sizes_for(scenario.kind, UPLOAD_QUIRKS)
    files = make_files(scenario.tmp / "up", sizes)
    scenario.client.upload("/Root", [scenario.tmp / "up" / name for name in files])
    with scenario.mount() as m:
        assert sorted(os.listdir(m.path)) == sorted(files)
        for name, data in files.items():
            assert os.stat(m.path / name).st_size == len(data)
            assert (m.path / name).read_bytes() == data, name
        # random access into the multi-chunk file (CTR offsets, chunk-aligned fetches)
        big = files[f"f{5 * MiB + 4321}.bin"]
        with open(m.path / f"f{5 * MiB + 4321}.bin", "rb") as f:
            for offset in (131072 * 3 - 7, 3 * MiB + 5, len(big) - 100):
                f.seek(offset)
                assert f.read(4096) == big[offset : offset + 4096]


def test_mount_write_client_download(scenario: Scenario) -> None:
    """Files written through megafs download with the client's own MAC check."""
    sizes = sizes_for(scenario.kind, DOWNLOAD_QUIRKS)
    files = make_files(scenario.tmp / "src", sizes, prefix="w")
    with scenario.mount() as m:
        for name in files:
            # cp returns after close(), and megafs's close uploads synchronously
            subprocess.run(["cp", str(scenario.tmp / "src" / name), str(m.path)], check=True)
        listing, got = scenario.client.listing_and_download(
            [f"/Root/{n}" for n in files], scenario.tmp / "dl"
        )
    assert listing == {f"/Root/{n}": len(d) for n, d in files.items()}  # names: attributes
    for name, data in files.items():
        assert got[f"/Root/{name}"].read_bytes() == data, name


# --------------------------------------------------------------------------- tree operations


def test_client_tree_operations_seen_in_mount(scenario: Scenario) -> None:
    """mkdir / upload / rename / move / delete by the client reach a running mount (``sc``)."""
    client = scenario.client
    files = make_files(scenario.tmp / "ops", [10, 2000, 70000], prefix="op")
    local = [scenario.tmp / "ops" / n for n in files]
    with scenario.mount() as m:
        expected: dict[str, int | None] = {"by-client": None}
        expected |= {f"by-client/{n}": len(d) for n, d in files.items()}
        if isinstance(client, MegaPy):
            client.ok(
                {"op": "mkdir", "path": "/Root/by-client"},
                *({"op": "upload", "local": str(f), "dest": "/Root/by-client"} for f in local),
            )
        else:
            client.mkdir("/Root/by-client")
            client.upload("/Root/by-client", local)
        wait_until("the client's folder and files", lambda: tree_of(m.path) == expected)
        assert (m.path / "by-client" / "op2000.bin").read_bytes() == files["op2000.bin"]
        if isinstance(client, MegaPy):
            # megatools 1.11 has no rename or move (its commands: df dl ls test export get put
            # copy mkdir rm reg); mega.py's delete moves into the Rubbish Bin
            client.ok(
                {"op": "mkdir", "path": "/Root/second"},
                {"op": "rename", "path": "/Root/by-client/op10.bin", "name": "renamed.bin"},
                {"op": "move", "path": "/Root/by-client/op2000.bin", "dest": "/Root/second"},
                {"op": "delete", "path": "/Root/by-client/op70000.bin"},
            )
            expected = {
                "by-client": None,
                "by-client/renamed.bin": 10,
                "second": None,
                "second/op2000.bin": 2000,
            }
            wait_until("rename, move and delete", lambda: tree_of(m.path) == expected)
            assert (m.path / "second" / "op2000.bin").read_bytes() == files["op2000.bin"]
            assert (m.path / "by-client" / "renamed.bin").read_bytes() == files["op10.bin"]
            # deletes for good: a file, then its folder with what is left inside
            client.ok(
                {"op": "destroy", "path": "/Root/by-client/renamed.bin"},
                {"op": "destroy", "path": "/Root/by-client"},
            )
            expected = {"second": None, "second/op2000.bin": 2000}
        else:
            client.remove("/Root/by-client/op10.bin")
            expected.pop("by-client/op10.bin")
            wait_until("a file deleted for good", lambda: tree_of(m.path) == expected)
            client.remove("/Root/by-client")  # with what is left inside
            expected = {}
        wait_until("the deletes", lambda: tree_of(m.path) == expected)


def test_mount_tree_operations_seen_by_client(scenario: Scenario) -> None:
    """mkdir / write / rename / move / unlink / rmdir in the mount, as the client sees them."""
    client = scenario.client
    with scenario.mount() as m:
        (m.path / "dir-a").mkdir()
        (m.path / "dir-a" / "sub").mkdir()
        (m.path / "dir-b").mkdir()
        (m.path / "dir-a" / "one.txt").write_bytes(b"one\n")
        (m.path / "dir-a" / "two.txt").write_bytes(b"two two\n")
        (m.path / "gone.txt").write_bytes(b"soon deleted\n")
        (m.path / "dir-gone").mkdir()
        assert client.ls() == {
            "/Root/dir-a": None,
            "/Root/dir-a/sub": None,
            "/Root/dir-b": None,
            "/Root/dir-a/one.txt": 4,
            "/Root/dir-a/two.txt": 8,
            "/Root/gone.txt": 13,
            "/Root/dir-gone": None,
        }
        os.rename(m.path / "dir-a" / "one.txt", m.path / "dir-a" / "uno.txt")  # rename
        os.rename(m.path / "dir-a" / "two.txt", m.path / "dir-b" / "two.txt")  # move
        os.rename(m.path / "dir-a" / "sub", m.path / "dir-b" / "moved-sub")  # move + rename
        os.unlink(m.path / "gone.txt")
        os.rmdir(m.path / "dir-gone")
        in_mount = client.ls()
    # again once unmounted: nothing that happened later (e.g. a stale attribute write) undid it
    final, got = client.listing_and_download(
        ["/Root/dir-a/uno.txt", "/Root/dir-b/two.txt"], scenario.tmp / "dl"
    )
    # megafs deletes into the Rubbish Bin by default (-o mega_delete=permanent skips it)
    expected = {
        "/Root/dir-a": None,
        "/Root/dir-a/uno.txt": 4,
        "/Root/dir-b": None,
        "/Root/dir-b/two.txt": 8,
        "/Root/dir-b/moved-sub": None,
        "/Trash/gone.txt": 13,
        "/Trash/dir-gone": None,
    }
    assert in_mount == expected
    assert final == expected
    assert got["/Root/dir-a/uno.txt"].read_bytes() == b"one\n"
    assert got["/Root/dir-b/two.txt"].read_bytes() == b"two two\n"


# --------------------------------------------------------------------------- df


def test_df_matches_statvfs(scenario: Scenario) -> None:
    files = make_files(scenario.tmp / "df", [123457, 1 * MiB + 3])
    scenario.client.upload("/Root", [scenario.tmp / "df" / n for n in files])
    scenario.emulator.set_quota(3 * (1 << 30), scenario.email)
    df = scenario.client.df()
    used = sum(len(d) for d in files.values())
    assert df == {"total": 3 * (1 << 30), "used": used, "free": 3 * (1 << 30) - used}
    with scenario.mount() as m:
        st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == df["total"]
    assert st.f_bfree == df["free"] // st.f_frsize  # free space, rounded down to blocks
    assert st.f_bavail == st.f_bfree


# --------------------------------------------------------------------------- client quirks


def test_quirk_megatools_cannot_upload_empty_files(
    thirdparty_emulator: tuple[EmulatorProcess, TlsFront], tmp_path: Path
) -> None:
    """megatools 1.11 never POSTs the (empty) body of a 0-byte file, so it gets no completion
    token and gives up ("Mega didn't return an upload handle"): the emulator sees ``u``
    requests but no storage POST. mega.py (which POSTs an empty body to ``<url>/0``) uploads
    empty files fine, and megafs writes them (``test_mount_write_client_download``)."""
    emulator, front = thirdparty_emulator
    emulator.reset()
    email, password = ACCOUNTS[2]
    client = Megatools(front, tmp_path / "megatools", email, password)
    (tmp_path / "empty.bin").write_bytes(b"")
    before = emulator.stats()
    result = client.run(
        "put", "--no-progress", "--path", "/Root", str(tmp_path / "empty.bin"), check=False
    )
    after = emulator.stats()
    assert result.returncode != 0
    assert "Mega didn't return an upload handle" in result.stderr
    assert after.get("cs:u", 0) > before.get("cs:u", 0)  # it asked for upload URLs...
    assert after.get("ul", 0) == before.get("ul", 0)  # ...and never sent a byte
    assert client.ls() == {}


def test_quirk_megapy_last_chunk_of_at_most_16_bytes(
    thirdparty_emulator: tuple[EmulatorProcess, TlsFront], tmp_path: Path
) -> None:
    """mega.py 1.0.8's MAC loop (``upload`` and ``_download_file``) takes the last 16-byte
    block of a chunk at ``i + 16``, where ``i`` is left over from the previous chunk when the
    final chunk holds at most 16 bytes: the block is empty, AES returns b"", and
    ``file_mac[0]`` raises IndexError. So mega.py can neither upload nor download a 131073-byte
    file. The download still decrypted every byte correctly first: its temp file matches."""
    emulator, _ = thirdparty_emulator
    emulator.reset()
    email, password = ACCOUNTS[2]
    data = os.urandom(131073)
    (tmp_path / "f131073.bin").write_bytes(data)
    with MegaPy(emulator, tmp_path / "megapy", email, password) as client:
        up = client.run({"op": "upload", "local": str(tmp_path / "f131073.bin"), "dest": "/Root"})
        assert up[0]["error"] == "IndexError", up
        assert "mega/mega.py" in up[0]["where"]
        assert "file_mac[0] ^ file_mac[1]" in up[0]["where"]
        assert client.ls() == {}  # it crashed before creating the node

        # the same size written by megafs: megatools downloads it (test_mount_write_...);
        # mega.py decrypts it right, then crashes in the same MAC code
        with mega_mount(emulator, email, password, tmp_path) as m:
            shutil.copy(tmp_path / "f131073.bin", m.path / "f131073.bin")
        for leftover in client.tmpdir.iterdir():
            leftover.unlink()
        down = client.run(
            {"op": "download", "path": "/Root/f131073.bin", "dest_dir": str(tmp_path)}
        )
        assert down[0]["error"] == "IndexError", down
        assert "mega/mega.py" in down[0]["where"]
        assert "file_mac[0] ^ file_mac[1]" in down[0]["where"]
        (temp,) = client.tmpdir.glob("megapy_*")  # mega.py's NamedTemporaryFile, never moved
        assert temp.read_bytes() == data


def test_quirk_megapy_cannot_download_empty_files(
    thirdparty_emulator: tuple[EmulatorProcess, TlsFront], tmp_path: Path
) -> None:
    """mega.py 1.0.8's ``get_chunks(0)`` yields one empty chunk; the MAC of its empty last block
    is b"" and ``file_mac[0]`` raises IndexError -- for empty files mega.py uploaded itself
    too, so the file's key is not the cause (megatools downloads the same file fine)."""
    emulator, front = thirdparty_emulator
    emulator.reset()
    email, password = ACCOUNTS[2]
    (tmp_path / "e.bin").write_bytes(b"")
    with MegaPy(emulator, tmp_path / "megapy", email, password) as client:
        client.upload("/Root", [tmp_path / "e.bin"])
        results = client.run(
            {"op": "download", "path": "/Root/e.bin", "dest_dir": str(tmp_path / "dl")}
        )
    assert results[0]["error"] == "IndexError", results
    assert "file_mac[0] ^ file_mac[1]" in results[0]["where"]
    megatools = Megatools(front, tmp_path / "megatools", email, password)
    assert megatools.get("/Root/e.bin", tmp_path / "mt").read_bytes() == b""


@pytest.mark.parametrize("kind", ["megatools", "megapy"])
def test_clients_check_the_mac(
    thirdparty_emulator: tuple[EmulatorProcess, TlsFront], tmp_path: Path, kind: str
) -> None:
    """The downloads above prove megafs's MACs only if the clients check them: a file whose
    key carries a wrong meta-MAC (one bit flipped) must be refused by both."""
    emulator, front = thirdparty_emulator
    emulator.reset()
    email, password = ACCOUNTS[2]
    data = os.urandom(300000)
    with EmuClient(emulator.url) as uploader:
        uploader.login(email, password)
        for name in ("good.bin", "bad.bin"):
            token, key = uploader.put_data(data)
            if name == "bad.bin":
                flipped = bytes([key.meta_mac[0] ^ 1]) + key.meta_mac[1:]
                key = crypto.FileKey(key.aes_key, key.nonce, flipped)
            node = {
                "h": crypto.b64encode(token),
                "t": 0,
                "a": crypto.encrypt_attributes({"n": name}, key.aes_key),
                "k": crypto.encrypt_key(uploader.master_key, key.pack()),
            }
            uploader.one({"a": "p", "t": uploader.root(), "n": [node]})
    if kind == "megatools":
        client = Megatools(front, tmp_path / "megatools", email, password)
        assert client.get("/Root/good.bin", tmp_path / "dl").read_bytes() == data
        result = client.run(
            "get", "--no-progress", "--path", str(tmp_path / "dl"), "/Root/bad.bin", check=False
        )
        assert result.returncode != 0 and "MAC mismatch" in result.stderr, result.stderr
    else:
        (tmp_path / "dl").mkdir()
        with MegaPy(emulator, tmp_path / "megapy", email, password) as mp:
            results = mp.run(
                {"op": "download", "path": "/Root/good.bin", "dest_dir": str(tmp_path / "dl")},
                {"op": "download", "path": "/Root/bad.bin", "dest_dir": str(tmp_path / "dl")},
            )
        assert "ok" in results[0], results
        assert Path(results[0]["ok"]).read_bytes() == data
        assert results[1] == {
            "error": "ValueError",
            "message": "Mismatched mac",
            "where": results[1]["where"],
        }
        assert "mega/mega.py" in results[1]["where"]
