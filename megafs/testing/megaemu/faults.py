"""Fault injection for the MEGA emulator: what to break, where, and how often.

A :class:`Fault` names a place (``match``) and a behaviour (``kind``):

========================  ==========================================================
``match``                 requests it applies to
========================  ==========================================================
``cs``                    every ``/cs`` request (for ``command_error``: every command)
``cs:<command>``          ``/cs`` requests whose batch holds that command (for
                          ``command_error``: that command only)
``sc`` ``wsc`` ``wait``   the event channel, the held-open form, the long-poll URL
``ul`` ``dl``             storage-server upload / download requests
========================  ==========================================================

Kinds: ``request_error`` (bare error number instead of the response; on ``ul`` the ``-N`` body
the upload server sends), ``command_error`` (one command answers ``code``, the rest of the batch
runs), ``http`` (``status`` with ``headers`` and an optional ``body``), ``hashcash`` (HTTP 402 +
``X-Hashcash: 1:<easiness>:<ts>:<token>``; the request is then accepted only with a valid
``X-Hashcash: 1:<token>:<cash>``), ``drop`` (close the connection without a response),
``truncate`` (promise the full body, send half, close), ``delay`` (sleep ``seconds`` first) and
``expire_urls`` (acts at once: every download/upload URL handed out so far answers 403, or the
upload-server error ``code`` when one is given).

``count`` is how many requests (commands for ``command_error``; challenges for ``hashcash``) the
fault affects; ``-1`` means until cleared. ``phase`` says whether ``drop``/``truncate``/``delay``
act ``before`` the request is executed or ``after`` it (the response is then lost although the
server state changed: the retransmission case). ``drop`` and ``truncate`` default to ``after``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

from megafs.mega import crypto

ROUTES: Final = ("cs", "sc", "wsc", "wait", "ul", "dl")
KINDS: Final = (
    "request_error",
    "command_error",
    "http",
    "hashcash",
    "drop",
    "truncate",
    "delay",
    "expire_urls",
)


@dataclass
class Fault:
    """One fault rule (see the module docstring)."""

    match: str
    kind: str
    code: int = -3
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    easiness: int = 255
    seconds: float = 1.0
    count: int = 1
    phase: str = "before"

    @property
    def route(self) -> str:
        return self.match.partition(":")[0]

    @property
    def command(self) -> str | None:
        return self.match.partition(":")[2] or None

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Fault:
        """Validate a control-plane fault description; raises ValueError."""
        match = spec.get("match")
        kind = spec.get("kind")
        if not isinstance(match, str) or match.partition(":")[0] not in ROUTES:
            raise ValueError(f"bad match {match!r}; one of {ROUTES} (or cs:<command>)")
        if ":" in match and not match.startswith("cs:"):
            raise ValueError("only cs takes a :<command> suffix")
        if kind not in KINDS:
            raise ValueError(f"bad kind {kind!r}; one of {KINDS}")
        assert isinstance(kind, str)
        route = match.partition(":")[0]
        if kind == "command_error" and route != "cs":
            raise ValueError("command_error applies to cs only")
        if kind == "request_error" and route == "dl":
            raise ValueError("the download server has no error bodies: use kind http")
        default_phase = "after" if kind in ("drop", "truncate") else "before"
        phase = spec.get("phase", default_phase)
        if phase not in ("before", "after"):
            raise ValueError("phase is before or after")
        if kind == "truncate":
            phase = "after"
        headers = spec.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in headers.items()
        ):
            raise ValueError("headers must map names to strings")
        fault = cls(
            match=match,
            kind=kind,
            code=int(spec.get("code", -3)),
            status=int(spec.get("status", 500)),
            headers={k: str(v) for k, v in headers.items()},
            body=str(spec.get("body", "")),
            easiness=int(spec.get("easiness", 255)),
            seconds=float(spec.get("seconds", 1.0)),
            count=int(spec.get("count", 1)),
            phase=phase,
        )
        if fault.count == 0 or fault.count < -1:
            raise ValueError("count is a positive number, or -1 for unlimited")
        if not 0 <= fault.easiness <= 255:
            raise ValueError("easiness is 0..255")
        if not 100 <= fault.status <= 599:
            raise ValueError("bad HTTP status")
        if fault.seconds < 0:
            raise ValueError("seconds must not be negative")
        return fault

    def to_json(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "kind": self.kind,
            "code": self.code,
            "status": self.status,
            "headers": dict(self.headers),
            "body": self.body,
            "easiness": self.easiness,
            "seconds": self.seconds,
            "count": self.count,
            "phase": self.phase,
        }

    def matches(self, route: str, commands: Sequence[str]) -> bool:
        if self.route != route:
            return False
        command = self.command
        return command is None or command in commands


@dataclass(frozen=True)
class Challenge:
    """A hashcash challenge handed out and not yet answered."""

    token: str
    easiness: int
    match: str
    issued: int

    @property
    def header(self) -> str:
        return f"1:{self.easiness}:{self.issued}:{self.token}"


@final
class FaultPlan:
    """The active fault rules and outstanding hashcash challenges (pure, no I/O)."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.challenges: dict[str, Challenge] = {}

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self) -> None:
        self.faults.clear()
        self.challenges.clear()

    def _consume(self, fault: Fault) -> Fault:
        if fault.count > 0:
            fault.count -= 1
            if fault.count == 0:
                self.faults.remove(fault)
        return fault

    def take(self, route: str, commands: Sequence[str] = ()) -> Fault | None:
        """The first request-level fault for this request, counted as used."""
        for fault in self.faults:
            if fault.kind != "command_error" and fault.matches(route, commands):
                return self._consume(fault)
        return None

    def take_command(self, command: str) -> Fault | None:
        """The first ``command_error`` fault for one command of a batch, counted as used."""
        for fault in self.faults:
            if fault.kind == "command_error" and fault.command in (None, command):
                return self._consume(fault)
        return None

    def issue_challenge(self, fault: Fault, now: float, token: str | None = None) -> Challenge:
        token = token or crypto.b64encode(secrets.token_bytes(48))
        challenge = Challenge(token, fault.easiness, fault.match, int(now))
        self.challenges[token] = challenge
        return challenge

    def pending_challenge(self, route: str, commands: Sequence[str]) -> Challenge | None:
        """An unanswered challenge that this request has to answer first."""
        for challenge in self.challenges.values():
            route_, _, command = challenge.match.partition(":")
            if route_ == route and (not command or command in commands):
                return challenge
        return None

    def redeem(self, header: str, check: Callable[[str, str, int], bool]) -> bool:
        """Accept ``1:<token>:<cash>`` for an outstanding challenge (then it is spent)."""
        version, _, rest = header.strip().partition(":")
        token, _, cash = rest.partition(":")
        challenge = self.challenges.get(token)
        if version != "1" or challenge is None or not cash:
            return False
        try:
            ok = check(token, cash, challenge.easiness)
        except ValueError:
            return False
        if ok:
            del self.challenges[token]
        return ok
