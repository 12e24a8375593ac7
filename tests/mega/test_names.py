"""MEGA names shown as POSIX names: safe and reversible."""

from __future__ import annotations

import random

import pytest

from megafs.mega.names import (
    DOT,
    NUL,
    QUOTE,
    SLASH,
    from_posix_bytes,
    posix_bytes,
    to_mega,
    to_posix,
)

AWKWARD = [
    "",
    ".",
    "..",
    "a/b",
    "/",
    "a\0b",
    "\0",
    "...",
    SLASH,
    NUL,
    DOT,
    DOT + DOT,
    QUOTE,
    QUOTE + QUOTE,
    QUOTE + "x",
    "x" + QUOTE,
    QUOTE + "/",
    QUOTE + SLASH,
    "a" + QUOTE + DOT,
    "plain name.txt",
    "日本語",
    "100% done",
    "-rf",
]


@pytest.mark.parametrize("name", AWKWARD)
def test_every_mega_name_shows_as_a_valid_posix_name_and_back(name: str) -> None:
    shown = to_posix(name)
    assert shown not in ("", ".", "..")
    assert "/" not in shown and "\0" not in shown
    assert to_mega(shown) == name
    raw = posix_bytes(name)
    assert raw is not None and from_posix_bytes(raw) == name


def test_random_names_round_trip() -> None:
    rng = random.Random(7)
    alphabet = ["a", ".", "/", "\0", QUOTE, SLASH, NUL, DOT, "é"]
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        assert to_mega(to_posix(name)) == name


@pytest.mark.parametrize("shown", ["a/b".replace("/", SLASH), QUOTE + "x", "x" + QUOTE, DOT, QUOTE])
def test_names_created_in_the_mount_show_unchanged(shown: str) -> None:
    name = from_posix_bytes(shown.encode())
    assert name is not None and to_posix(name) == shown


def test_names_that_no_mega_name_shows_as_are_refused() -> None:
    assert from_posix_bytes((QUOTE + QUOTE + "x").encode()) is None
    assert from_posix_bytes(b"\xff\xfe") is None


def test_too_long_names_are_not_shown() -> None:
    assert posix_bytes("x" * 255) is not None
    assert posix_bytes("x" * 256) is None
    assert posix_bytes("\ud800") is None
