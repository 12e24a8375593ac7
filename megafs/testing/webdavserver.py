"""Real WebDAV servers on 127.0.0.1 for tests: ``rclone serve webdav``.

:func:`rclone_webdav` is a context manager yielding a :class:`WebDavServer`: the
``webdav+http://`` URL of its root and the environment that carries its credentials.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WebDavServer:
    """A running server: ``url`` is its root; ``root`` the directory it serves."""

    url: str
    env: dict[str, str]
    root: Path
    user: str
    password: str
    kind: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"WebDAV server exited early:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("WebDAV server did not start listening")


@contextlib.contextmanager
def rclone_webdav(
    root: Path | None = None, user: str = "megafs", password: str = "s3cret-pw"
) -> Iterator[WebDavServer]:
    """Run ``rclone serve webdav`` on a local directory with basic auth."""
    exe = shutil.which("rclone")
    if exe is None:
        raise RuntimeError("rclone is not installed (scripts/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="megafs-dav-") as tmp:
        served = root or Path(tmp) / "root"
        served.mkdir(parents=True, exist_ok=True)
        log = Path(tmp) / "rclone.log"
        port = _free_port()
        env = {**os.environ, "RCLONE_CONFIG": str(Path(tmp) / "rclone.conf")}
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [
                    exe,
                    "serve",
                    "webdav",
                    str(served),
                    "--addr",
                    f"127.0.0.1:{port}",
                    "--user",
                    user,
                    "--pass",
                    password,
                    # see directories the tests make behind the server's back at once
                    "--dir-cache-time",
                    "0s",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
        with _running(proc, port, log):
            yield _server(port, served, user, password, "rclone")


def _server(port: int, served: Path, user: str, password: str, kind: str) -> WebDavServer:
    return WebDavServer(
        url=f"webdav+http://127.0.0.1:{port}/",
        env={"MEGAFS_WEBDAV_USER": user, "MEGAFS_WEBDAV_PASSWORD": password},
        root=served,
        user=user,
        password=password,
        kind=kind,
    )


@contextlib.contextmanager
def _running(proc: subprocess.Popen[bytes], port: int, log: Path) -> Iterator[None]:
    """Wait for the server's port; stop the server afterwards, whatever happened."""
    try:
        _wait_port(port, proc, log, 20.0)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_APACHE_MODULES = (
    "mpm_prefork",
    "authn_core",
    "authn_file",
    "authz_core",
    "authz_user",
    "auth_basic",
    "auth_digest",
    "dav",
    "dav_fs",
)


@contextlib.contextmanager
def apache_webdav(
    user: str = "megafs", password: str = "s3cret-pw", *, digest_auth: bool = False
) -> Iterator[WebDavServer]:
    """Run Apache httpd (prefork, ``-DFOREGROUND``) with mod_dav_fs and basic auth.

    Run as root, httpd drops to ``nobody``: the served tree is then owned by it, so make
    directories in it over WebDAV (MKCOL), not on disk.
    """
    exe = shutil.which("apache2") or "/usr/sbin/apache2"
    if not os.path.exists(exe):
        raise RuntimeError("apache2 is not installed (scripts/setup installs it)")
    mods = "/usr/lib/apache2/modules"
    with tempfile.TemporaryDirectory(prefix="megafs-httpd-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        served = base / "root"
        lockdir = base / "lock"
        for d in (served, lockdir):
            d.mkdir()
        digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        if digest_auth:
            ha1 = hashlib.md5(f"{user}:megafs:{password}".encode()).hexdigest()
            (base / "htpasswd").write_text(f"{user}:megafs:{ha1}\n")
        else:
            (base / "htpasswd").write_text(f"{user}:{{SHA}}{digest}\n")
        auth_type = "Digest" if digest_auth else "Basic"
        port = _free_port()
        run_as = ""
        if os.geteuid() == 0:
            run_as = "User nobody\nGroup nogroup\n"
            for d in (served, lockdir):
                os.chown(d, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        loads = "".join(f"LoadModule {m}_module {mods}/mod_{m}.so\n" for m in _APACHE_MODULES)
        conf = base / "httpd.conf"
        conf.write_text(
            f"ServerRoot {base}\n{loads}{run_as}"
            f"Listen 127.0.0.1:{port}\nServerName 127.0.0.1\n"
            "StartServers 4\nMinSpareServers 4\nMaxRequestWorkers 40\nKeepAliveTimeout 2\n"
            f"PidFile {base}/httpd.pid\nErrorLog {base}/error.log\n"
            f"DAVLockDB {lockdir}/davlock\n"
            f'DocumentRoot "{served}"\n'
            f'<Directory "{served}">\n'
            f"  Dav On\n  AuthType {auth_type}\n  AuthName megafs\n"
            f"  AuthBasicProvider file\n  AuthUserFile {base}/htpasswd\n"
            "  Require valid-user\n</Directory>\n"
        )
        log = base / "error.log"
        log.touch()
        with open(base / "stdout.log", "wb") as out:
            # Its own session: prefork signals its whole process group on shutdown.
            proc = subprocess.Popen(
                [exe, "-DFOREGROUND", "-f", str(conf)],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        with _running(proc, port, log):
            yield _server(port, served, user, password, "apache")
