"""One process of the concurrent namespace stress (tests/test_robustness.py).

``python stress_worker.py ROOT SEED SECONDS`` loops for SECONDS over random
create/write/rename/link/symlink/unlink/mkdir/rmdir/``rm -rf``/read/list operations on
the few shared :data:`NAMES` under ROOT, and prints one JSON line: how many operations
succeeded and every unexpected error. Standard library only, so it starts quickly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import time

NAMES = ["a", "b", "c", "d", "a/x", "b/y", "c/a/z"]
# Errors that concurrent changes to the same names legitimately cause.
BENIGN = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOTEMPTY,
    errno.EINVAL,
    errno.ELOOP,
}
# rm -rf's messages for the same races (ELOOP: a name is a symlink loop).
RM_BENIGN = (
    "No such file",
    "Directory not empty",
    "Not a directory",
    "Is a directory",
    "Too many levels of symbolic links",
)


def valid_contents() -> list[bytes]:
    """Every content a worker ever writes (sizes around the 4 and 16 KiB inline
    limits and across a 4 MiB chunk boundary)."""
    sizes = [1, 100, 4095, 4096, 4097, 16383, 16384, 16385, 70_000, 4 * 1024 * 1024 + 10]
    return [
        (f"<content {k} of size {n}>".encode() * (n // 20 + 1))[:n] for k, n in enumerate(sizes)
    ]


def main(root: str, seed: int, seconds: float) -> dict[str, object]:
    rng = random.Random(seed)
    contents = valid_contents()
    bad: list[str] = []
    ops = tries = 0

    def p(name: str) -> str:
        return os.path.join(root, name)

    def write_all(fd: int) -> None:
        view = memoryview(rng.choice(contents))
        while view:
            view = view[os.write(fd, view) :]

    def write_new(path: str) -> None:
        # Writers hold an exclusive flock, so every file's content is one whole valid
        # content (or empty for a moment between create and lock).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)  # an overwrite may have got the lock first
            write_all(fd)
        finally:
            os.close(fd)

    def overwrite(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            write_all(fd)
        finally:
            os.close(fd)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        op = rng.choice(
            [
                "create",
                "create",
                "overwrite",
                "replace",
                "rename",
                "link",
                "symlink",
                "unlink",
                "mkdir",
                "rmdir",
                "rmrf",
                "read",
                "list",
            ]
        )
        a, b = p(rng.choice(NAMES)), p(rng.choice(NAMES))
        tries += 1
        try:
            if op == "create":
                write_new(a)
            elif op == "overwrite":
                overwrite(a)
            elif op == "replace":
                tmp = p(f"tmp-{seed}-{tries}")
                write_new(tmp)
                try:
                    os.rename(tmp, a)
                except OSError:
                    os.unlink(tmp)
                    raise
            elif op == "rename":
                os.rename(a, b)
            elif op == "link":
                try:
                    os.link(a, b, follow_symlinks=False)
                except PermissionError:
                    pass  # a is a directory (now)
            elif op == "symlink":
                os.symlink(rng.choice(NAMES), a)
            elif op == "unlink":
                os.unlink(a)
            elif op == "mkdir":
                os.mkdir(a)
            elif op == "rmdir":
                os.rmdir(a)
            elif op == "rmrf":
                r = subprocess.run(["rm", "-rf", a], capture_output=True, text=True)
                # Entries vanishing or appearing under rm's feet are fine; I/O errors,
                # a dead mount or anything else are not.
                bad += [
                    f"rm -rf: {ln}"
                    for ln in r.stderr.splitlines()
                    if not any(s in ln for s in RM_BENIGN)
                ]
            elif op == "read":
                with open(a, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_SH)
                    data = f.read()
                if data and data not in contents:
                    bad.append(f"read {a}: {len(data)} bytes of no valid content")
            elif op == "list":
                os.listdir(a)
            ops += 1
        except OSError as exc:
            if exc.errno not in BENIGN:
                bad.append(f"{op} {a} {b}: {exc!r}")
    return {"ops": ops, "tries": tries, "bad": bad[:50]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
