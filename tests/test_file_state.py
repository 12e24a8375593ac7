"""``user.megafs.state``: is this file safely on the store? (getfattr answers)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import MEGAFS, needs_fuse, new_mount, serving

STATE = "user.megafs.state"


@needs_fuse
def test_state_goes_dirty_uploading_clean(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.3"])
    with serving(m):
        f = m.path / "f.bin"
        with open(f, "wb") as out:
            out.write(os.urandom(5 << 20))
            assert os.getxattr(f, STATE) == b"dirty"  # in memory only
            out.flush()
            os.fsync(out.fileno())
            assert os.getxattr(f, STATE) in (b"uploading", b"clean")
        seen = set()
        deadline = time.monotonic() + 60
        while (state := os.getxattr(f, STATE)) != b"clean":
            seen.add(state)
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        assert seen <= {b"uploading", b"dirty"}
        assert b"uploading" in seen  # 0.3 s per request: the upload is seen in flight
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True)
        assert os.getxattr(f, STATE) == b"clean"
        assert STATE not in os.listxattr(f)  # answered, never listed
        # getfattr, the way a user asks.
        out = subprocess.run(
            ["getfattr", "-n", STATE, "--only-values", str(f)], capture_output=True, text=True
        )
        assert out.stdout == "clean", out
