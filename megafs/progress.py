"""A one-line progress display for long commands (``umount``, ``fsck``, ``gc``).

Drawn on standard error, and only when it is a terminal (and ``TERM`` is not
``dumb``): piped or logged output gets no bars and no control characters. The line
is redrawn in place (``\\r`` + erase to end of line), at most every ``interval``
seconds, cut to the terminal's width so it never wraps, and erased by :meth:`done`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO, final

BAR_WIDTH = 20


def human_bytes(n: float) -> str:
    """``1.5 MiB`` style: binary units, one decimal from KiB up."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#########---------------]`` for a fraction in [0, 1]."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


@final
class ProgressLine:
    """See the module docstring. ``enabled=None``: only on a terminal."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        interval: float = 0.2,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.interval = interval
        self.shown = False
        self._last = float("-inf")

    def update(self, text: str, fraction: float | None = None, *, force: bool = False) -> None:
        """Show ``text`` (with a bar and a percentage when ``fraction`` is given). The
        first update is drawn at once, later ones at most every ``interval`` s."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        suffix = ""
        if fraction is not None:
            suffix = f" {bar(fraction)} {max(0.0, min(1.0, fraction)) * 100:3.0f}%"
        width = self._width() - 1  # the last column would wrap on some terminals
        room = width - len(suffix)
        if len(text) > room:  # cut the text, keep the bar
            text = text[: max(0, room - 3)] + "..."
        self.stream.write("\r\033[K" + (text + suffix)[:width])
        self.stream.flush()
        self.shown = True

    def done(self, final: str | None = None) -> None:
        """Erase the line; then print ``final`` on its own line, if the line was ever
        shown (a terminal user saw progress and is told how it ended)."""
        if not self.shown:
            return
        self.stream.write("\r\033[K")
        if final:
            self.stream.write(final + "\n")
        self.stream.flush()
        self.shown = False

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size().columns
