"""Run unmodified third-party MEGA clients against the emulator (protocol spec §7, §11).

* megatools 1.11 (Debian package) hard-codes ``https://g.api.mega.co.nz/`` and pins MEGA's TLS
  key. It runs in a private mount namespace (``unshare --mount``; host network) where a
  bind-mounted ``/etc/hosts`` sends ``g.api.mega.co.nz`` to a loopback address on which the
  emulator also listens with TLS (``--tls-bind ADDR:443``), and a bind-mounted
  ``/etc/ssl/certs`` holds only a throw-away test CA; ``MEGATOOLS_PKP_DISABLE=1`` turns the
  pinning off so libcurl checks the chain against that CA.
* mega.py 1.0.8 (in ``.venv-thirdparty``, see ``scripts/setup``) builds
  ``<schema>://g.api.<domain>/cs``: ``megapy_driver.py`` sets ``schema = "http"`` and
  ``HTTP_PROXY`` points at the emulator's plain listener, which accepts absolute-form targets.

Both are installed by ``scripts/setup``; a missing one fails the tests (no skips).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from megafs.testing.megaemu.process import EmulatorProcess, start_emulator

ROOT = Path(__file__).resolve().parents[2]
THIRDPARTY_PYTHON = ROOT / ".venv-thirdparty" / "bin" / "python"
MEGAPY_DRIVER = Path(__file__).with_name("megapy_driver.py")
API_HOST = "g.api.mega.co.nz"
CLIENT_TIMEOUT = 120.0
#: Logins per command or client: both clients fail 1 login in 256 on their own (see the code).
LOGIN_ATTEMPTS = 3


def require_tools() -> None:
    """Fail (never skip) when a client is missing: ``scripts/setup`` installs both."""
    missing = []
    if shutil.which("megatools") is None:
        missing.append("megatools (Debian package megatools)")
    if not THIRDPARTY_PYTHON.exists():
        missing.append(f"mega.py (venv {THIRDPARTY_PYTHON.parent.parent})")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        pytest.fail("third-party MEGA clients missing, run scripts/setup: " + ", ".join(missing))


@dataclass(frozen=True)
class TlsFront:
    """What megatools' namespace sees: ``hosts`` (``/etc/hosts``), ``certs`` (``/etc/ssl/certs``
    with only the test CA) and the loopback ``address`` serving TLS as ``g.api.mega.co.nz``."""

    address: str
    hosts: Path
    certs: Path
    cert: Path
    key: Path


def make_tls_front(directory: Path, address: str) -> TlsFront:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(API_HOST)
    cert, key = directory / "api-cert.pem", directory / "api-key.pem"
    issued.private_key_pem.write_to_path(key)
    issued.cert_chain_pems[0].write_to_path(cert)
    certs = directory / "certs"
    certs.mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(certs / "ca-certificates.crt")
    hosts = directory / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{address} {API_HOST}\n")
    return TlsFront(address, hosts, certs, cert, key)


@contextlib.contextmanager
def start_thirdparty_emulator(
    directory: Path, *, accounts: dict[str, str], v1_accounts: dict[str, str]
) -> Iterator[tuple[EmulatorProcess, TlsFront]]:
    """An emulator serving plain HTTP on 127.0.0.1 (megafs, mega.py) and TLS as
    ``g.api.mega.co.nz`` on a random 127.x.y.z:443 (megatools), one state for both.

    A random loopback address (not 127.0.0.1:443) lets test runs share the machine.
    """
    with contextlib.ExitStack() as stack:
        for attempt in range(5):
            address = ".".join(["127", *(str(random.randint(low, 254)) for low in (100, 1, 2))])
            front = make_tls_front(directory / f"tls-{attempt}", address)
            emulator_args = (
                "--wait-timeout",
                "1.5",
                "--debug",  # every request in emulator.log (sid redacted), for failures
                "--tls-cert",
                str(front.cert),
                "--tls-key",
                str(front.key),
                "--tls-bind",
                f"{address}:443",
            )
            try:
                emulator = stack.enter_context(
                    start_emulator(
                        *emulator_args,
                        accounts=accounts,
                        v1_accounts=v1_accounts,
                        log=directory / "emulator.log",
                    )
                )
            except RuntimeError as exc:  # the address was taken: try another
                if "exited with status" not in str(exc) or attempt == 4:
                    raise
                continue
            yield emulator, front
            return


class Megatools:
    """``megatools`` as ``email``, in a private mount namespace aimed at the emulator."""

    def __init__(self, front: TlsFront, workdir: Path, email: str, password: str) -> None:
        self.front = front
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # megatools caches its session (and tree) in $TMPDIR for 10 minutes: one private
        # $TMPDIR per client object, so its commands share a session the way they do for users
        # (and, as megatools numbers requests from time(NULL) in every process, repeat
        # (sid, id) pairs within a second -- see test_emulator's retransmission tests)
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.megarc = workdir / "megarc"
        self.megarc.write_text(f"[Login]\nUsername = {email}\nPassword = {password}\n")
        self.megarc.chmod(0o600)

    def run(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        script = (
            'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/ssl/certs && shift 2 && '
            'exec megatools "$@"'
        )
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            str(self.front.hosts),
            str(self.front.certs),
            command,
            "--config",
            str(self.megarc),
            "--no-ask-password",
        ]
        if command not in ("dl", "reg"):
            argv.append("--reload")  # not the cached tree: what the server has now
        argv += list(args)
        env = {
            **os.environ,
            "MEGATOOLS_PKP_DISABLE": "1",
            "TMPDIR": str(self.tmpdir),
            "HOME": str(self.workdir),
        }
        for _attempt in range(LOGIN_ATTEMPTS):
            result = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT,
                check=False,
                cwd=self.workdir,
            )
            # megatools turns the RSA-decrypted session block into bytes with BN_bn2bin (the
            # minimal encoding) and keeps the first 43: when the server's random session token
            # starts with a 0x00 byte (1 login in 256) it keeps the wrong bytes and the ``ug``
            # right after fails with ESID (protocol spec §9 item 5) -- megatools' bug, and
            # nothing has run yet, so log in again.
            if not ("Can't login to mega.nz" in result.stderr and "ESID" in result.stderr):
                break
        if check and result.returncode != 0:
            raise AssertionError(
                f"megatools {command} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def ls(self) -> dict[str, int | None]:
        """Every node below /Root and /Trash: path -> size (None for folders)."""
        out = self.run("ls", "--long").stdout
        listing: dict[str, int | None] = {}
        for line in out.splitlines():
            cut = line.find(" /")
            if cut < 0:
                continue
            path = line[cut + 1 :]
            fields = line[:cut].split()
            # handle [owner] type size [date time]: the owner column is blank for the roots
            kind, size = fields[2:4] if len(fields) == 6 else fields[1:3]
            if path.startswith(("/Root/", "/Trash/")):
                # megatools prints "-" as the size of folders and of empty files
                listing[path] = None if kind == "1" else 0 if size == "-" else int(size)
        return listing

    def put(self, remote_dir: str, *local: Path) -> subprocess.CompletedProcess[str]:
        return self.run("put", "--no-progress", "--path", remote_dir, *map(str, local))

    def get(self, remote: str, local_dir: Path) -> Path:
        local_dir.mkdir(parents=True, exist_ok=True)
        self.run("get", "--no-progress", "--path", str(local_dir), remote)
        return local_dir / remote.rsplit("/", 1)[1]

    def df(self) -> dict[str, int]:
        """``megatools df``: total, used and free bytes."""
        out = self.run("df").stdout
        values = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return {k.strip().lower(): int(v) for k, v in values.items()}

    # the operations both clients offer (see MegaPy)

    def upload(self, remote_dir: str, files: list[Path]) -> None:
        self.put(remote_dir, *files)

    def download(self, remotes: list[str], local_dir: Path) -> dict[str, Path]:
        local_dir.mkdir(parents=True, exist_ok=True)
        self.run("get", "--no-progress", "--path", str(local_dir), *remotes)
        return {r: local_dir / r.rsplit("/", 1)[1] for r in remotes}

    def listing_and_download(
        self, remotes: list[str], local_dir: Path
    ) -> tuple[dict[str, int | None], dict[str, Path]]:
        """:meth:`ls`, then download what is there (callers check the listing first)."""
        listing = self.ls()
        local_dir.mkdir(parents=True, exist_ok=True)
        self.run("get", "--no-progress", "--path", str(local_dir), *remotes, check=False)
        got = {r: local_dir / r.rsplit("/", 1)[1] for r in remotes}
        return listing, {r: p for r, p in got.items() if p.exists()}

    def mkdir(self, path: str) -> None:
        self.run("mkdir", path)

    def remove(self, path: str) -> None:
        """``megatools rm``: deletes for good (``d``), subtree included."""
        self.run("rm", path)


class MegaPy:
    """mega.py 1.0.8 as ``email``, through ``megapy_driver.py``: one process and one login
    (a v1 login takes seconds in mega.py's pure-Python key derivation) for all :meth:`run`
    calls; :meth:`close` ends it."""

    def __init__(self, emulator: EmulatorProcess, workdir: Path, email: str, password: str):
        self.emulator = emulator
        self.workdir = workdir
        self.tmpdir = workdir / "tmp"  # mega.py downloads into a tempfile first
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.email = email
        self.password = password
        self.login_attempts = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> MegaPy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _talk(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], CLIENT_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            log = (self.workdir / "megapy.log").read_text(errors="replace")
            raise AssertionError(f"mega.py driver died or hung:\n{log}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _start(self) -> None:
        env = {
            **os.environ,
            "HTTP_PROXY": self.emulator.url,
            "http_proxy": self.emulator.url,
            "NO_PROXY": "",
            "no_proxy": "",
            "TMPDIR": str(self.tmpdir),
        }
        with open(self.workdir / "megapy.log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(THIRDPARTY_PYTHON), str(MEGAPY_DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )
        self.login_attempts = self._talk({"email": self.email, "password": self.password})[
            "login_attempts"
        ]

    def run(self, *ops: dict[str, Any]) -> list[dict[str, Any]]:
        """Run ``ops`` in the logged-in client; their results (see ``megapy_driver.py``)."""
        if self._proc is None:
            self._start()
        results: list[dict[str, Any]] = self._talk({"ops": list(ops)})["results"]
        return results

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def ok(self, *ops: dict[str, Any]) -> list[Any]:
        """Run ``ops``; each must succeed; their values."""
        results = self.run(*ops)
        failed = [(op, r) for op, r in zip(ops, results, strict=True) if "ok" not in r]
        assert not failed, f"mega.py operations failed: {failed}"
        return [r["ok"] for r in results]

    def ls(self) -> dict[str, int | None]:
        """Like :meth:`Megatools.ls`."""
        return self._sizes(self.ok({"op": "ls"})[0])

    @staticmethod
    def _sizes(listing: dict[str, Any]) -> dict[str, int | None]:
        return {
            p: (None if n["t"] == 1 else int(n["s"]))
            for p, n in listing.items()
            if p.startswith(("/Root/", "/Trash/"))
        }

    def upload(self, remote_dir: str, files: list[Path]) -> None:
        self.ok(*({"op": "upload", "local": str(f), "dest": remote_dir} for f in files))

    def download(self, remotes: list[str], local_dir: Path) -> dict[str, Path]:
        local_dir.mkdir(parents=True, exist_ok=True)
        ops = ({"op": "download", "path": r, "dest_dir": str(local_dir)} for r in remotes)
        return {r: Path(p) for r, p in zip(remotes, self.ok(*ops), strict=True)}

    def listing_and_download(
        self, remotes: list[str], local_dir: Path
    ) -> tuple[dict[str, int | None], dict[str, Path]]:
        """:meth:`ls`, then download what is there, in one run (a v1 login takes seconds in
        mega.py); callers check the listing first."""
        local_dir.mkdir(parents=True, exist_ok=True)
        ops = [{"op": "download", "path": r, "dest_dir": str(local_dir)} for r in remotes]
        listing, *results = self.run({"op": "ls"}, *ops)
        got = {r: Path(res["ok"]) for r, res in zip(remotes, results, strict=True) if "ok" in res}
        return self._sizes(listing["ok"]), got

    def mkdir(self, path: str) -> None:
        self.ok({"op": "mkdir", "path": path})

    def remove(self, path: str) -> None:
        """mega.py's ``destroy``: deletes for good (``d``)."""
        self.ok({"op": "destroy", "path": path})

    def df(self) -> dict[str, int]:
        space = self.ok({"op": "df"})[0]
        total, used = int(space["total"]), int(space["used"])
        return {"total": total, "used": used, "free": total - used}
