"""``scripts/bench-mega``: megafs on a MEGA account, through the emulator, with latency.

Fills an emulator account with ``--nodes`` nodes (folders of small files), adds
``--latency`` seconds to every API, upload and download request (the emulator's
``delay`` faults), then times, through a real mount:

* mounting with a fresh cache (login + fetching the tree) and remounting (session resumed),
* ``ls -lR`` of the whole account after dropping the kernel's caches,
* writing a ``--size-mib`` file of random bytes (``dd ... conv=fsync``, which returns once
  the file is staged durably, then until MEGA holds it) and reading it back through a
  fresh mount with an empty block cache.

Prints one line per measurement and, with ``--json FILE``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megafs.mega import crypto
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import start_emulator

EMAIL, PASSWORD = "bench@example.com", "bench-Passw0rd"
MEGAFS = [sys.executable, "-m", "megafs.cli"]
BATCH = 100  # uploads opened / nodes created per API request while filling the account


def fill(client: EmuClient, nodes: int, files_per_folder: int = 99) -> int:
    """Create about ``nodes`` nodes: folders under the root, each with small files."""
    root = client.root()
    made = 0
    folder_no = 0
    while made < nodes:
        folder = client.mkdir(root, f"folder-{folder_no:05d}")["h"]
        folder_no += 1
        made += 1
        count = min(files_per_folder, nodes - made)
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            datas = [os.urandom(1 + (start + i) % 4000) for i in range(n)]
            urls = client.call(*({"a": "u", "s": len(d), "v": 2} for d in datas))
            new = []
            for i, (data, up) in enumerate(zip(datas, urls, strict=True)):
                key = crypto.FileKey.random()
                cipher = crypto.ctr_crypt(key.aes_key, key.nonce, 0, data)
                token = client.http.post(f"{up['p']}/0", content=cipher).content
                mac = crypto.condensed_mac(
                    key.aes_key, [crypto.chunk_mac(key.aes_key, key.nonce, data)]
                )
                key = crypto.FileKey(key.aes_key, key.nonce, mac)
                new.append(
                    {
                        "h": crypto.b64encode(token),
                        "t": 0,
                        "a": crypto.encrypt_attributes(
                            {"n": f"file-{start + i:04d}.txt"}, key.aes_key
                        ),
                        "k": crypto.encrypt_key(client.master_key, key.pack()),
                    }
                )
            client.one({"a": "p", "t": folder, "n": new})
            made += n
    return made


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("(cannot drop the kernel's caches: not root?)", file=sys.stderr)


def timed(argv: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench-mega", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--latency", type=float, default=0.020, help="seconds per request")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, float] = {}

    def report(name: str, value: float, unit: str) -> None:
        results[name] = round(value, 3)
        print(f"{name:<34} {value:10.2f} {unit}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="megabench-"))
    mnt, cache = tmp / "mnt", tmp / "cache"
    mnt.mkdir()
    with start_emulator(accounts={EMAIL: PASSWORD}, log=tmp / "emulator.log") as emu:
        env = {**os.environ, "MEGAFS_MEGA_API_URL": emu.url, "MEGAFS_PASSPHRASE": PASSWORD}
        mount = [*MEGAFS, "mount", f"mega://{EMAIL}", str(mnt), "-o", f"cache_dir={cache}"]
        umount = [*MEGAFS, "umount", str(mnt)]
        t0 = time.perf_counter()
        with EmuClient(emu.url) as client:
            client.login(EMAIL, PASSWORD)
            made = fill(client, args.nodes)
        print(f"(filled the account with {made} nodes in {time.perf_counter() - t0:.1f} s)")
        for route in ("cs", "ul", "dl", "sc"):
            emu.fault(route, "delay", seconds=args.latency, count=-1)
        try:
            report(f"mount, {made} nodes, login", timed(mount, env=env), "s")
            drop_caches()
            t = timed(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL)
            report("ls -lR after drop_caches", t, "s")
            t = timed(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL)
            report("ls -lR again (warm)", t, "s")
            subprocess.run(umount, check=True, env=env)
            report("remount (session resumed)", timed(mount, env=env), "s")

            src = tmp / "random.bin"
            size = args.size_mib * 1024 * 1024
            with open(src, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(1024 * 1024))
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            drop_caches()
            dd = ["dd", f"if={src}", f"of={mnt / 'big.bin'}", "bs=1M", "conv=fsync", "status=none"]
            t0 = time.perf_counter()
            subprocess.run(dd, check=True)
            t = time.perf_counter() - t0
            report(f"write {args.size_mib} MiB, dd conv=fsync", size / t / 1e6, "MB/s")
            idle = [*MEGAFS, "status", str(mnt), "--wait-idle"]
            subprocess.run(idle, check=True, stdout=subprocess.DEVNULL, env=env)
            t = time.perf_counter() - t0
            report(f"write {args.size_mib} MiB, until on MEGA", size / t / 1e6, "MB/s")
            subprocess.run(umount, check=True, env=env)
            shutil.rmtree(cache / next(p.name for p in cache.glob("mega-*")) / "blocks")
            subprocess.run(mount, check=True, env=env)
            drop_caches()
            t0 = time.perf_counter()
            h = hashlib.sha256()
            with open(mnt / "big.bin", "rb") as r:
                while block := r.read(1 << 20):
                    h.update(block)
            t = time.perf_counter() - t0
            if h.hexdigest() != digest:
                raise SystemExit("bench-mega: the file read back differs from the one written")
            report(f"read {args.size_mib} MiB, cold cache", size / t / 1e6, "MB/s")
        finally:
            subprocess.run(umount, check=False, env=env)
            emu.clear_faults()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
