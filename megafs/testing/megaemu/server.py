"""Serve the emulator with hypercorn under trio (plain HTTP or TLS).

Hypercorn answers 500 when an application sends nothing, so it cannot "drop" a connection by
itself; :class:`_DroppingTCPServer` closes the connection instead of sending any response whose
head carries :data:`~megafs.testing.megaemu.app.DROP_HEADER`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import cast

import hypercorn.trio
import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import Framework

from megafs.testing.megaemu.app import DROP_HEADER, EmulatorApp
from megafs.testing.megaemu.blobs import DirBlobs
from megafs.testing.megaemu.state import EmulatorState

log = logging.getLogger("megafs.testing.megaemu")

SNAPSHOT = "state.json"


def _is_dropped_head(data: bytes) -> bool:
    """Whether ``data`` is a response head (never a body) that carries the drop marker."""
    if not data.startswith(b"HTTP/1."):
        return False
    head, sep, _ = data.partition(b"\r\n\r\n")
    return bool(sep) and b"\r\n" + DROP_HEADER + b":" in head.lower()


class _DroppingTCPServer(TCPServer):
    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData) and _is_dropped_head(bytes(event.data[:16384])):
            await trio.aclose_forcefully(self.stream)
            await self.protocol.handle(Closed())
            return
        await super().protocol_send(event)


def _install_drop_support() -> None:
    setattr(hypercorn.trio.run, "TCPServer", _DroppingTCPServer)  # noqa: B010


async def serve(
    app: EmulatorApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    certfile: str | None = None,
    keyfile: str | None = None,
    tls_bind: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (or cancellation); ``task_status`` gets
    the base URL, e.g. ``http://127.0.0.1:PORT``.

    With ``certfile``/``keyfile`` the listener speaks TLS -- unless ``tls_bind`` (``HOST:PORT``)
    is given too: then ``host:port`` stays plain HTTP (its URL goes to ``task_status``) and an
    extra HTTPS listener at ``tls_bind`` serves the same app and state (e.g. a client with a
    hard-coded ``https://g.api.mega.co.nz/`` next to megafs on plain HTTP).
    """
    _install_drop_support()
    config = Config()
    plain = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config.bind = [plain]
    if certfile is not None:
        config.certfile = certfile
        config.keyfile = keyfile
    if tls_bind is not None:
        if certfile is None:
            raise ValueError("tls_bind needs certfile and keyfile")
        config.bind = [tls_bind]
        config.insecure_bind = [plain]
    config.accesslog = None
    config.errorlog = logging.getLogger("megafs.testing.megaemu.hypercorn")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                hypercorn.trio.serve,
                cast(Framework, app),
                config,
                shutdown_trigger=shutdown_trigger,
            )
        )
        # hypercorn lists the TLS binds first, then the insecure ones
        task_status.started(binds[-1] if tls_bind is not None else binds[0])


def save_snapshot(state: EmulatorState, state_dir: Path) -> None:
    """Write the state atomically to ``state_dir/state.json``."""
    tmp = state_dir / (SNAPSHOT + ".tmp")
    state.dirty = False
    with open(tmp, "w") as f:
        json.dump(state.snapshot(), f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / SNAPSHOT)


def load_state(state_dir: Path, *, rsa_bits: int = 2048) -> EmulatorState:
    """A state whose blobs live in ``state_dir/blobs``, restored from its snapshot if any."""
    state_dir.mkdir(parents=True, exist_ok=True)
    blobs = DirBlobs(state_dir / "blobs")
    state = EmulatorState(blobs=blobs, rsa_bits=rsa_bits)
    snapshot = state_dir / SNAPSHOT
    if snapshot.exists():
        with open(snapshot) as f:
            state.restore(json.load(f))
        blobs.prune(state.live_blobs())
    return state


async def keep_saved(state: EmulatorState, state_dir: Path, interval: float = 0.5) -> None:
    """Save the state whenever it changed, at most every ``interval`` seconds, and once more
    when cancelled."""
    try:
        while True:
            await trio.sleep(interval)
            if state.dirty:
                save_snapshot(state, state_dir)
    finally:
        if state.dirty:
            save_snapshot(state, state_dir)
