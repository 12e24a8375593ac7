"""Drive the unmodified third-party client mega.py 1.0.8 (run by ``.venv-thirdparty``'s Python).

Not a test module: ``tests/mega/thirdparty.py`` runs it as a subprocess and talks JSON lines.
The first line on stdin is ``{"email", "password"}``: the driver logs in once and answers
``{"login_attempts": N}``. Every further line is ``{"ops": [...]}``; the driver runs the
operations in order and answers ``{"results": [...]}``: per operation either ``{"ok": value}``
or ``{"error": <exception class>, "message", "where"}`` (``where``: the file and line that
raised -- inside mega.py when it is the client's own failure). It exits at the end of stdin.
Paths look like megatools' (``/Root/dir/file``, ``/Trash/...``).

Operations: ``ls`` -> ``{path: {"h", "t", "s"}}``; ``upload`` {local, dest}; ``download``
{path, dest_dir}; ``mkdir`` {path}; ``rename`` {path, name}; ``move`` {path, dest};
``delete`` {path} (mega.py's delete: a move to the Rubbish Bin); ``destroy`` {path};
``df`` -> mega.py's ``get_storage_space()``.

The API host is hard-coded in mega.py as ``<schema>://g.api.<domain>/cs``; the caller sets
``HTTP_PROXY`` to the emulator and this script sets ``schema = "http"`` (protocol spec §7.2).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from mega import Mega  # type: ignore[import-not-found]
from mega.errors import RequestError  # type: ignore[import-not-found]

ROOTS = {2: "/Root", 3: "/Inbox", 4: "/Trash"}
LOGIN_ATTEMPTS = 3


def login(email: str, password: str) -> tuple[Any, int]:
    """Log in; retry on ESID right after login.

    mega.py turns the decrypted RSA session block into bytes with ``'%x' % m`` (the minimal
    integer encoding) and keeps the first 43 bytes: when the server's random 43-byte session
    token starts with a 0x00 byte (1 login in 256) it keeps the wrong bytes and its first
    command fails with ESID (-15) -- protocol spec §9 item 5. That is mega.py's bug, not the
    server's, so the harness simply logs in again.
    """
    for attempt in range(1, LOGIN_ATTEMPTS + 1):
        m = Mega()
        m.schema = "http"  # requests then sends the absolute-form URL to HTTP_PROXY
        try:
            m.login(email, password)
        except RequestError as exc:
            if exc.code != -15 or attempt == LOGIN_ATTEMPTS:
                raise
            continue
        return m, attempt
    raise AssertionError("unreachable")


def paths(m: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """All nodes by megatools-style path, and path -> handle."""
    files = m.get_files()
    names: dict[str, str] = {}

    def path_of(h: str) -> str:
        if h in names:
            return names[h]
        node = files[h]
        if node["t"] in ROOTS:
            result = ROOTS[node["t"]]
        else:
            result = path_of(node["p"]) + "/" + node["a"]["n"]
        names[h] = result
        return result

    by_path: dict[str, Any] = {}
    for h, node in files.items():
        if node["t"] in (0, 1, 2, 3, 4) and (node["t"] > 1 or node.get("p") in files):
            by_path[path_of(h)] = node
    return by_path, {p: n["h"] for p, n in by_path.items()}


def run(m: Any, op: dict[str, Any]) -> Any:
    kind = op["op"]
    if kind == "df":
        return m.get_storage_space()
    nodes, handles = paths(m)
    if kind == "ls":
        return {p: {"h": n["h"], "t": n["t"], "s": n.get("s")} for p, n in nodes.items()}
    if kind == "upload":
        reply = m.upload(op["local"], handles[op["dest"]])
        return reply["f"][0]["h"]
    if kind == "download":
        node = nodes[op["path"]]
        return str(m.download((node["h"], node), op["dest_dir"]))
    if kind == "mkdir":
        parent, _, name = op["path"].rpartition("/")
        return m.create_folder(name, handles[parent])[name]
    if kind == "rename":
        node = nodes[op["path"]]
        return m.rename((node["h"], node), op["name"])
    if kind == "move":
        return m.move(handles[op["path"]], handles[op["dest"]])
    if kind == "delete":
        return m.delete(handles[op["path"]])
    if kind == "destroy":
        return m.destroy(handles[op["path"]])
    raise ValueError(f"unknown operation {kind!r}")


def reply(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> int:
    if not os.environ.get("HTTP_PROXY"):
        raise SystemExit("megapy_driver: HTTP_PROXY must point at the emulator")
    account = json.loads(sys.stdin.readline())
    m, attempts = login(account["email"], account["password"])
    reply({"login_attempts": attempts})
    for line in sys.stdin:
        results: list[dict[str, Any]] = []
        for op in json.loads(line)["ops"]:
            try:
                results.append({"ok": run(m, op)})
            except Exception as exc:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                results.append(
                    {
                        "error": type(exc).__name__,
                        "message": str(exc),
                        "where": f"{frame.filename}:{frame.lineno}: {frame.line}",
                    }
                )
        reply({"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
