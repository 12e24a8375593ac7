"""Command line: ``python -m megafs.testing.megaemu`` (or ``scripts/mega-emulator``).

Prints exactly one line, ``megaemu listening on <url>``, to stdout once it accepts requests.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from megafs.mega import crypto
from megafs.testing.megaemu.app import EmulatorApp
from megafs.testing.megaemu.server import keep_saved, load_state, serve
from megafs.testing.megaemu.state import EmulatorState

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(suffix)]
    try:
        return int(float(number) * _SUFFIXES[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _credentials(text: str) -> tuple[str, str]:
    email, sep, password = text.partition(":")
    if not sep or not email or not password:
        raise argparse.ArgumentTypeError("expected EMAIL:PASSWORD")
    return email, password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mega-emulator",
        description="A local, crypto-blind emulator of the MEGA API for tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--account",
        type=_credentials,
        action="append",
        default=[],
        metavar="EMAIL:PASSWORD",
        help="create this account at start (v2 unless --v1)",
    )
    parser.add_argument("--v1", action="store_true", help="make the --account accounts v1")
    parser.add_argument(
        "--v1-account",
        type=_credentials,
        action="append",
        default=[],
        metavar="EMAIL:PASSWORD",
        help="create this v1 account at start",
    )
    parser.add_argument("--rsa-bits", type=int, default=2048)
    parser.add_argument(
        "--state-dir", type=Path, help="keep ciphertext and a state snapshot here (restored)"
    )
    parser.add_argument("--quota", type=_size, help="storage allowance per account (20 GiB)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-bind",
        metavar="HOST:PORT",
        help="with --tls-cert: keep --host/--port plain HTTP and also serve HTTPS here "
        "(same state), e.g. 127.0.0.1:443 for clients with a hard-coded API host",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=20.0,
        help="seconds a long poll (wait URL, wsc) is held open at most",
    )
    parser.add_argument("--debug", action="store_true", help="log every request to stderr")
    return parser


async def _run(args: argparse.Namespace, state: EmulatorState) -> None:
    app = EmulatorApp(state, wait_timeout=args.wait_timeout)
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        if args.state_dir is not None:
            nursery.start_soon(keep_saved, state, args.state_dir)
        async with trio.open_nursery() as server:
            url = await server.start(
                lambda task_status: serve(
                    app,
                    host=args.host,
                    port=args.port,
                    certfile=args.tls_cert,
                    keyfile=args.tls_key,
                    tls_bind=args.tls_bind,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            print(f"megaemu listening on {url}", flush=True)
        nursery.cancel_scope.cancel()  # the server has shut down: stop the helpers (final save)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("mega-emulator: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_bind is not None and args.tls_cert is None:
        print("mega-emulator: --tls-bind needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.state_dir is not None:
        state = load_state(args.state_dir, rsa_bits=args.rsa_bits)
    else:
        state = EmulatorState(rsa_bits=args.rsa_bits)
    if args.quota is not None:
        state.set_quota(args.quota)
    wanted = [(e, p, 1 if args.v1 else 2) for e, p in args.account]
    wanted += [(e, p, 1) for e, p in args.v1_account]
    for email, password, version in wanted:
        if email.lower() in state.by_email:
            continue  # restored from --state-dir
        state.register_account(crypto.new_account(email, password, version, rsa_bits=args.rsa_bits))
    try:
        trio.run(_run, args, state)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
