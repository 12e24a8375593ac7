"""sd_notify(3), by hand: tell the service manager about the daemon's state.

systemd (``Type=notify``) passes the path of a datagram socket in ``NOTIFY_SOCKET``; a
daemon sends it newline-separated ``KEY=value`` fields in one datagram: ``READY=1`` once
the service is up, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` when it begins
to shut down. A leading ``@`` names a socket in the abstract namespace. Without
``NOTIFY_SOCKET`` (not started by systemd, or a forked daemon that is not the unit's main
process) every call is a no-op.

Sending never raises: a lost notification must not take the mount down. Each call opens
its own socket, so callers in any thread (or trio task) need no coordination.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

#: How long one send may block (systemd drains its socket at once; a test listener may not).
SEND_TIMEOUT = 1.0


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # unset, or a kind megafs does not speak (vsock:...)


def enabled() -> bool:
    """Whether a service manager listens for notifications."""
    return _address() is not None


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=idle"``...) as one datagram; True if sent."""
    addr = _address()
    if addr is None or not fields:
        return False
    payload = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SEND_TIMEOUT)
            s.connect(addr)
            s.sendall(payload)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
