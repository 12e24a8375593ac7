"""The MEGA emulator as a raw ASGI application (HTTP/1.1; run it with :mod:`.server`).

Routes (origin-form ``/cs?...`` and absolute-form ``http://g.api.mega.co.nz/cs?...`` targets alike,
so the emulator also works as the HTTP proxy of a client with a hard-coded API host):

* ``POST /cs?id=&sid=`` -- JSON command batch (``state.EmulatorState.cs``).
* ``POST /sc?sn=&sid=`` -- pending action packets ``{"a": [...], "sn": ...}`` or
  ``{"w": "<wait url>"}``; ``GET|POST <wait url>`` returns (empty body) as soon as a packet is
  pending after that ``sn``, or after ``wait_timeout`` seconds.
* ``POST /wsc?sn=&sid=`` -- held open until packets are pending (or ``wait_timeout``), then
  ``{"a": [...], "sn": ...}``.
* ``POST /ul/<token>/<offset>[?c=|?d=]`` -- upload ciphertext pieces.
* ``GET|POST /dl/<token>[/<start>-<end>]`` (inclusive end) and ``Range: bytes=...``.
* ``/_emu/...`` -- the control plane for tests: ``POST|GET|DELETE faults``, ``GET|DELETE stats``,
  ``POST account`` ``{email, password, version, rsa_bits?}``, ``POST quota`` ``{mstrg, email?}``,
  ``POST expire_sessions`` ``{email?}``, ``GET tree?email=``, ``POST reset``, ``GET health``.

Transfer and wait URLs are built from the ``Host`` the client used (and the connection's scheme),
so they work behind a TLS name too; an absolute-form (proxy) request gets URLs naming the address
the emulator listens on. Requests are logged at debug level only, with ``sid`` redacted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, final
from urllib.parse import parse_qsl, urlsplit

import trio

from megafs.mega import crypto
from megafs.testing.megaemu.faults import Fault
from megafs.testing.megaemu.state import (
    Account,
    DownloadGrant,
    EmulatorState,
    command_names,
    encode_sn,
    strip_sid,
)

log = logging.getLogger("megafs.testing.megaemu")

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: A response carrying this header is never sent: the server closes the connection instead
#: (see ``server.py``); under another ASGI server the client sees a cut-off 500 response.
DROP_HEADER: Final = b"x-megaemu-drop"
_SEND_PIECE: Final = 1 << 20
_RANGE_PATH = re.compile(r"^(\d+)-(\d+)$")
_RANGE_HEADER = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    base_url: str

    def arg(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


@final
class EmulatorApp:
    """ASGI application over one :class:`EmulatorState`."""

    def __init__(self, state: EmulatorState, *, wait_timeout: float = 20.0) -> None:
        self.state = state
        self.wait_timeout = wait_timeout
        self._wakeups: dict[str, trio.Event] = {}
        state.add_listener(self._wake)

    # ------------------------------------------------------------------ ASGI plumbing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = await self._read(scope, receive)
        await self._dispatch(request, send)

    @staticmethod
    async def _read(scope: Scope, receive: Receive) -> Request:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    break
            else:  # http.disconnect
                break
        headers = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
            for k, v in scope.get("headers", [])
        }
        path: str = scope["path"]
        scheme: str = scope.get("scheme", "http")
        server = scope.get("server")
        if path.startswith(("http://", "https://")):  # absolute-form: we are the proxy
            path = urlsplit(path).path or "/"
            if server:
                base = f"{scheme}://{server[0]}:{server[1]}"
            else:
                base = f"{scheme}://{headers.get('host', '127.0.0.1')}"
        else:
            host = headers.get("host") or (f"{server[0]}:{server[1]}" if server else "127.0.0.1")
            base = f"{scheme}://{host}"
        query = parse_qsl(bytes(scope.get("query_string", b"")).decode("latin-1"), True)
        return Request(scope["method"], path, query, headers, b"".join(chunks), base)

    @staticmethod
    async def _send(send: Send, response: Response, *, truncate: bool = False) -> None:
        body = response.body
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"access-control-allow-origin", b"*"),
        ]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if truncate:  # promise everything, deliver half, then the connection is closed
            await send(
                {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
            )
            return
        view = memoryview(body)
        for start in range(0, len(body), _SEND_PIECE):
            piece = bytes(view[start : start + _SEND_PIECE])
            more = start + _SEND_PIECE < len(body)
            await send({"type": "http.response.body", "body": piece, "more_body": more})
        if not body:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _drop(send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": [(DROP_HEADER, b"1")]})

    # ------------------------------------------------------------------ dispatch and faults

    async def _dispatch(self, request: Request, send: Send) -> None:
        path = request.path
        if path.startswith("/_emu/"):
            response = await self._control(request)
            self._log(request, response.status)
            await self._send(send, response)
            return
        handler: Callable[[Request], Awaitable[Response]]
        if path == "/cs":
            route, handler = "cs", self._cs
        elif path == "/sc":
            route, handler = "sc", self._sc
        elif path == "/wsc":
            route, handler = "wsc", self._wsc
        elif path.startswith("/wait/"):
            route, handler = "wait", self._wait
        elif path.startswith("/ul/"):
            route, handler = "ul", self._ul
        elif path.startswith("/dl/"):
            route, handler = "dl", self._dl
        else:
            self._log(request, 404)
            await self._send(send, Response(404, b"", "text/plain"))
            return
        commands = command_names(request.body) if route == "cs" else []
        stats = self.state.stats
        stats[route] += 1
        for name in commands:
            stats[f"cs:{name}"] += 1

        faults = self.state.faults
        solution = request.headers.get("x-hashcash")
        if solution is None or not faults.redeem(solution, crypto.hashcash_check):
            pending = faults.pending_challenge(route, commands)
            if pending is not None:
                self._log(request, 402)
                await self._send(send, Response(402, b"", headers=[("X-Hashcash", pending.header)]))
                return
        fault = faults.take(route, commands)
        after: Fault | None = None
        if fault is not None:
            stats["faults"] += 1
            early = await self._fault_before(fault, route)
            if early is not None:
                self._log(request, early.status, fault.kind)
                if early.status == 0:
                    await self._drop(send)
                else:
                    await self._send(send, early)
                return
            if fault.phase == "after":
                after = fault
        response = await handler(request)
        if after is None:
            self._log(request, response.status)
            await self._send(send, response)
        elif after.kind == "delay":
            await trio.sleep(after.seconds)
            self._log(request, response.status, "delay")
            await self._send(send, response)
        elif after.kind == "drop":
            self._log(request, 0, "drop")
            await self._drop(send)
        else:
            self._log(request, response.status, "truncate")
            await self._send(send, response, truncate=True)

    async def _fault_before(self, fault: Fault, route: str) -> Response | None:
        """The response a fault sends instead of running the request (status 0: drop it)."""
        kind = fault.kind
        if kind == "delay":
            if fault.phase == "before":
                await trio.sleep(fault.seconds)
            return None
        if kind in ("drop", "truncate"):
            return Response(0) if fault.phase == "before" and kind == "drop" else None
        if kind == "http":
            content_type = "application/json" if fault.body.startswith("-") else "text/plain"
            return Response(
                fault.status, fault.body.encode(), content_type, list(fault.headers.items())
            )
        if kind == "request_error":
            if route == "ul":
                return Response(200, str(fault.code).encode(), "application/octet-stream")
            return json_response(fault.code)
        if kind == "hashcash":
            challenge = self.state.faults.issue_challenge(fault, self.state.clock())
            return Response(402, b"", headers=[("X-Hashcash", challenge.header)])
        return None

    def _log(self, request: Request, status: int, fault: str | None = None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s?%s -> %s%s",
                request.method,
                request.path,
                strip_sid(request.query),
                status or "dropped",
                f" (fault: {fault})" if fault else "",
            )

    # ------------------------------------------------------------------ API and events

    async def _cs(self, request: Request) -> Response:
        result = self.state.cs(
            request.body,
            sid=request.arg("sid"),
            request_id=request.arg("id"),
            base_url=request.base_url,
        )
        return json_response(result)

    async def _sc(self, request: Request) -> Response:
        result = self.state.sc(sid=request.arg("sid"), sn=request.arg("sn"))
        if isinstance(result, dict) and "w" in result:
            result = {"w": f"{request.base_url}/wait/{result['w']}"}
        return json_response(result)

    async def _wsc(self, request: Request) -> Response:
        cursor = self.state.event_cursor(request.arg("sid"), request.arg("sn"))
        if isinstance(cursor, int):
            return json_response(cursor)
        account, seq = cursor
        await self._wait_for(account, seq)
        packets = self.state.packets_after(account, seq)
        return json_response({"a": packets, "sn": encode_sn(max(seq, account.seq))})

    async def _wait(self, request: Request) -> Response:
        target = self.state.wait_target(request.path[len("/wait/") :])
        if target is None:
            return Response(404, b"", "text/plain")
        await self._wait_for(*target)
        return Response(200, b"", "text/plain")

    def _wake(self, user: str) -> None:
        event = self._wakeups.pop(user, None)
        if event is not None:
            event.set()

    async def _wait_for(self, account: Account, seq: int) -> None:
        with trio.move_on_after(self.wait_timeout):
            while account.seq <= seq:
                event = self._wakeups.setdefault(account.handle, trio.Event())
                await event.wait()

    # ------------------------------------------------------------------ storage server

    async def _ul(self, request: Request) -> Response:
        parts = request.path[len("/ul/") :].split("/")
        if len(parts) != 2 or request.method != "POST":
            return Response(404, b"", "text/plain")
        d = request.arg("d")
        status, body = self.state.upload(
            parts[0],
            parts[1],
            request.body,
            crc=d if d is not None else request.arg("c"),
            zero_reply=d is not None,
        )
        return Response(status, body, "application/octet-stream")

    async def _dl(self, request: Request) -> Response:
        token, _, span = request.path[len("/dl/") :].partition("/")
        grant = self.state.download(token)
        if isinstance(grant, int):
            return Response(grant, b"", "text/plain")
        size = grant.size
        if span:
            m = _RANGE_PATH.match(span)
            if m is None:
                return Response(404, b"", "text/plain")
            start, end = int(m[1]), int(m[2]) + 1
            if start >= end or start > size:
                return Response(416, b"", "text/plain", [("Content-Range", f"bytes */{size}")])
            return self._bytes(grant, start, min(end, size))
        range_header = request.headers.get("range")
        if range_header is None:
            return self._bytes(grant, 0, size)
        m = _RANGE_HEADER.match(range_header.strip())
        if m is None or not (m[1] or m[2]):
            return self._bytes(grant, 0, size)  # unparsable Range: ignore it (RFC 9110)
        if m[1]:
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
        else:
            start, end = max(0, size - int(m[2])), size
        if start >= size or start >= end:
            return Response(416, b"", "text/plain", [("Content-Range", f"bytes */{size}")])
        response = self._bytes(grant, start, end)
        response.status = 206
        response.headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        return response

    def _bytes(self, grant: DownloadGrant, start: int, end: int) -> Response:
        body = self.state.read_blob(grant, start, end)
        return Response(200, body, "application/octet-stream", [("Accept-Ranges", "bytes")])

    # ------------------------------------------------------------------ control plane

    async def _control(self, request: Request) -> Response:
        name = request.path[len("/_emu/") :]
        method = request.method
        try:
            data = json.loads(request.body) if request.body else {}
            if not isinstance(data, dict):
                raise ValueError("a JSON object is expected")
            return await self._control_op(method, name, data, request)
        except KeyError as err:
            return json_response({"error": f"no such account: {err.args[0]}"}, 404)
        except (ValueError, TypeError) as err:
            return json_response({"error": str(err)}, 400)

    async def _control_op(
        self, method: str, name: str, data: dict[str, Any], request: Request
    ) -> Response:
        state = self.state
        if name == "faults" and method == "POST":
            fault = Fault.from_json(data)
            if fault.kind == "expire_urls":
                which = fault.route if fault.route in ("dl", "ul") else None
                code = data.get("code")
                ul_code = None if code is None else int(code)
                return json_response({"expired": state.expire_urls(which, ul_code=ul_code)})
            state.faults.add(fault)
            return json_response({"ok": True})
        if name == "faults" and method == "GET":
            return json_response([f.to_json() for f in state.faults.faults])
        if name == "faults" and method == "DELETE":
            state.faults.clear()
            return json_response({"ok": True})
        if name == "stats" and method == "GET":
            return json_response(dict(state.stats))
        if name == "stats" and method == "DELETE":
            state.stats.clear()
            return json_response({"ok": True})
        if name == "account" and method == "POST":
            email, password = str(data["email"]), str(data["password"])
            version = int(data.get("version", 2))
            if version not in (1, 2):
                raise ValueError("version is 1 or 2")
            bits = int(data.get("rsa_bits", state.rsa_bits))
            if email.lower() in state.by_email:
                raise ValueError(f"account {email} exists")
            new = await trio.to_thread.run_sync(
                lambda: crypto.new_account(email, password, version, rsa_bits=bits)
            )
            account = state.register_account(new)
            return json_response({"u": account.handle, "email": account.email})
        if name == "quota" and method == "POST":
            state.set_quota(int(data["mstrg"]), data.get("email"))
            return json_response({"ok": True})
        if name == "expire_sessions" and method == "POST":
            return json_response({"expired": state.expire_sessions(data.get("email"))})
        if name == "tree" and method == "GET":
            who = request.arg("email")
            if who is None:
                raise ValueError("email= is required")
            account = state.account(who)
            return json_response({"f": state.tree(who), "sn": encode_sn(account.seq)})
        if name == "reset" and method == "POST":
            state.reset()
            for user in list(self._wakeups):
                self._wake(user)
            return json_response({"ok": True})
        if name == "health":
            return json_response({"ok": True})
        return json_response({"error": f"no control operation {method} {name}"}, 404)
