"""The SDK streams: a 1 GiB upload and download through the API keeps the process's memory
under 200 MiB (issue 7).

The transfer runs in a child process, so that only its own memory counts, and the child
reports its own peak resident set size (``VmHWM`` of ``/proc/self/status``). Not
``wait4``'s ``ru_maxrss``: Linux keeps the largest RSS a process had before ``exec``,
which for a child forked (or vforked) from pytest is pytest's own size — 341 MiB late
in a full run. The file is pseudo-random (nothing compresses or deduplicates it),
made and hashed here 1 MiB at a time; the download goes through a second opening with
an empty cache directory, so every byte comes back from the store.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import PASSPHRASE, make_volume

MiB = 1 << 20
SIZE = 1024 * MiB
LIMIT = 200 * MiB

CHILD = textwrap.dedent(
    """
    import os, sys, trio
    import megafs.sdk

    store, cache, src, dst = sys.argv[1:5]
    seen = []

    async def main():
        pw = os.environ["MEGAFS_PASSPHRASE"]
        async with megafs.sdk.open_drive(store, passphrase=pw, cache_dir=cache + "/up") as d:
            stats = await d.upload(src, "big", progress=lambda done, total: seen.append(done))
            assert stats.bytes == os.path.getsize(src), stats
        # A new opening with an empty cache: the content comes from the store.
        async with megafs.sdk.open_drive(
            store, passphrase=pw, cache_dir=cache + "/down", read_only=True
        ) as d:
            assert (await d.stat("big")).st_size == os.path.getsize(src)
            await d.download("big", dst)
        status = open("/proc/self/status").read()
        hwm_kib = int(status.split("VmHWM:")[1].split()[0])
        print(len(seen), seen[-1], hwm_kib)

    trio.run(main)
    """
)


def _write_random(path: Path, size: int, seed: int) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            piece = rng.randbytes(MiB)
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def test_a_1_gib_upload_and_download_stay_under_200_mib(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    want = _write_random(src, SIZE, seed=7)
    env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE}
    started = time.monotonic()
    with open(tmp_path / "out", "wb") as out_f, open(tmp_path / "err", "wb") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store), str(tmp_path / "cache"), str(src), str(dst)],
            env=env,
            stdout=out_f,
            stderr=err_f,
        )
    try:
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, err
    calls, last, hwm_kib = map(int, out.split())
    assert last == SIZE and calls > SIZE // MiB // 2  # progress went along, to the end
    peak = hwm_kib * 1024
    print(f"1 GiB up and down in {time.monotonic() - started:.1f} s, peak RSS {peak / MiB:.0f} MiB")
    assert peak < LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    assert os.path.getsize(dst) == SIZE
    assert _sha256(dst) == want
