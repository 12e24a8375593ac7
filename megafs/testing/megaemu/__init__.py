"""A local, protocol-faithful and crypto-blind emulator of the MEGA API, for tests.

It stores what MEGA's servers store -- opaque encrypted blobs keyed by handles -- and never
decrypts anything, so a client that works against it has its cryptography right by
construction of real MEGA clients' formats (see ``shared/research/mega-protocol.md`` §11).

* :class:`~megafs.testing.megaemu.state.EmulatorState` -- the server state and every command,
  pure Python (also usable in-process).
* :class:`~megafs.testing.megaemu.app.EmulatorApp` -- the ASGI application (HTTP routes, fault
  injection, control plane under ``/_emu/``).
* :func:`~megafs.testing.megaemu.server.serve` -- run it with hypercorn under trio.
* ``python -m megafs.testing.megaemu`` / ``scripts/mega-emulator`` -- the command line.
"""

from megafs.testing.megaemu.app import EmulatorApp as EmulatorApp
from megafs.testing.megaemu.faults import Fault as Fault
from megafs.testing.megaemu.faults import FaultPlan as FaultPlan
from megafs.testing.megaemu.server import serve as serve
from megafs.testing.megaemu.state import EmulatorState as EmulatorState
