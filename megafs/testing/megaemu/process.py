"""Run the emulator as a subprocess (``scripts/mega-emulator``) and drive its control plane.

Tests that mount megafs need the emulator in its own process (the megafs daemon is another
process talking to it over HTTP), so the fixtures use :func:`start_emulator`.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import httpx

_READY = "megaemu listening on "


@final
@dataclass
class EmulatorProcess:
    """A running emulator: its base ``url`` and helpers for the ``/_emu/`` control plane."""

    url: str
    proc: subprocess.Popen[str]
    log: Path | None = None
    verify: ssl.SSLContext | bool = True
    accounts: dict[str, str] = field(default_factory=dict)  # e-mail -> password
    _http: httpx.Client | None = field(default=None, repr=False)

    def control(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        **params: str,
    ) -> Any:
        """Call ``/_emu/<path>``; raises httpx.HTTPStatusError on a 4xx/5xx answer."""
        if self._http is None:
            self._http = httpx.Client(timeout=60.0, verify=self.verify)
        response = self._http.request(
            method,
            f"{self.url}/_emu/{path}",
            json=dict(body) if body is not None else None,
            params=params,
        )
        response.raise_for_status()
        return response.json()

    def fault(self, match: str, kind: str, **spec: Any) -> Any:
        """Add a fault (see :mod:`megafs.testing.megaemu.faults`)."""
        return self.control("POST", "faults", {"match": match, "kind": kind, **spec})

    def clear_faults(self) -> None:
        self.control("DELETE", "faults")

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.control("GET", "stats")
        return result

    def tree(self, email: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.control("GET", "tree", email=email)["f"]
        return result

    def add_account(self, email: str, password: str, version: int = 2) -> str:
        """Create an account; returns its user handle."""
        handle: str = self.control(
            "POST", "account", {"email": email, "password": password, "version": version}
        )["u"]
        self.accounts[email.lower()] = password
        return handle

    def set_quota(self, mstrg: int, email: str | None = None) -> None:
        body: dict[str, Any] = {"mstrg": mstrg}
        if email is not None:
            body["email"] = email
        self.control("POST", "quota", body)

    def expire_sessions(self, email: str | None = None) -> int:
        n: int = self.control("POST", "expire_sessions", {} if email is None else {"email": email})[
            "expired"
        ]
        return n

    def reset(self) -> None:
        """Empty every tree and forget sessions, uploads, events, faults and counters."""
        self.control("POST", "reset")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def _script() -> list[str]:
    script = Path(__file__).resolve().parents[3] / "scripts" / "mega-emulator"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "megafs.testing.megaemu"]


@contextlib.contextmanager
def start_emulator(
    *args: str,
    accounts: Mapping[str, str] | None = None,
    v1_accounts: Mapping[str, str] | None = None,
    log: Path | None = None,
    rsa_bits: int = 1024,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 60.0,
) -> Iterator[EmulatorProcess]:
    """Start ``scripts/mega-emulator --port 0 ...``, wait for its ready line, stop it after.

    ``args`` are extra command-line options (``--state-dir``, ``--tls-cert``...); stderr goes to
    ``log`` (or is discarded).
    """
    argv = [*_script(), "--host", "127.0.0.1", "--port", "0", "--rsa-bits", str(rsa_bits)]
    for email, password in (accounts or {}).items():
        argv += ["--account", f"{email}:{password}"]
    for email, password in (v1_accounts or {}).items():
        argv += ["--v1-account", f"{email}:{password}"]
    argv += list(args)
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(open(log, "ab")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        emulator = EmulatorProcess("", proc, log, verify)
        try:
            emulator.url = _wait_ready(proc, timeout)
            emulator.accounts.update({e.lower(): p for e, p in (accounts or {}).items()})
            emulator.accounts.update({e.lower(): p for e, p in (v1_accounts or {}).items()})
            yield emulator
        finally:
            emulator.stop()


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("mega-emulator did not start in time")
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
        if ready:
            line = proc.stdout.readline()
            if line.startswith(_READY):
                return line[len(_READY) :].strip()
            if not line:
                raise RuntimeError(f"mega-emulator exited with status {proc.wait()}")
        elif proc.poll() is not None:
            raise RuntimeError(f"mega-emulator exited with status {proc.returncode}")
