"""MEGA's error codes as exceptions, and their errno mapping.

MEGA answers a failed command with a negative number (or ``{"err": n}``); the API
client turns each into an instance of the class below that owns the code, so callers
can ``except MegaNotFound`` rather than compare numbers. Every class also sits in the
project's own tree (:mod:`megafs.errors`), so generic code that only knows
``StoreError`` / ``StoreUnavailable`` / ``IntegrityError`` keeps working::

    StoreError (megafs.errors)
    └── MegaError                       any MEGA failure; .code is MEGA's number
        ├── MegaTransient               may succeed later (also a StoreUnavailable)
        │   ├── MegaTryAgain            -3  EAGAIN
        │   ├── MegaRateLimited         -4  ERATELIMIT
        │   ├── MegaTooMany             -6  ETOOMANY
        │   ├── MegaTempUnavailable     -18 ETEMPUNAVAIL
        │   ├── MegaTooManyConnections  -19 ETOOMANYCONNECTIONS
        │   └── MegaNetworkError        no answer: connection failures, timeouts, HTTP 5xx
        ├── MegaArgs                    -2  EARGS
        ├── MegaFailed                  -5  EFAILED
        ├── MegaRange                   -7  ERANGE
        ├── MegaExpired                 -8  EEXPIRED
        │   └── UrlExpired              a storage URL answered 403/404: ask ``g`` again
        ├── MegaNotFound                -9  ENOENT
        │   └── LoginFailed             ``us`` refused the e-mail/password pair
        ├── MegaCircular                -10 ECIRCULAR
        ├── MegaAccessDenied            -11 EACCESS
        ├── MegaExists                  -12 EEXIST
        ├── MegaIncomplete              -13 EINCOMPLETE
        ├── MegaKeyError                -14 EKEY (also an IntegrityError: MAC mismatch, bad key)
        ├── MegaSessionExpired          -15 ESID: log in again
        ├── MegaBlocked                 -16 EBLOCKED
        ├── MegaOverQuota               -17 EOVERQUOTA (also -24 EGOINGOVERQUOTA)
        │   └── MegaTransferQuota       HTTP 509 from a storage server (transfer quota)
        ├── MegaMfaRequired             -26 EMFAREQUIRED
        └── MegaError itself            every other code

:func:`errno_for` is the one table from these to errno values; anything that is not a
``MegaError`` is passed on to :func:`megafs.errors.errno_for`.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum
from typing import ClassVar

from megafs.errors import IntegrityError, StoreError, StoreUnavailable
from megafs.errors import errno_for as _project_errno_for


class ErrorCode(IntEnum):
    """MEGA's API error numbers (meganz/sdk ``ErrorCodes``)."""

    OK = 0
    EINTERNAL = -1
    EARGS = -2
    EAGAIN = -3
    ERATELIMIT = -4
    EFAILED = -5
    ETOOMANY = -6
    ERANGE = -7
    EEXPIRED = -8
    ENOENT = -9
    ECIRCULAR = -10
    EACCESS = -11
    EEXIST = -12
    EINCOMPLETE = -13
    EKEY = -14
    ESID = -15
    EBLOCKED = -16
    EOVERQUOTA = -17
    ETEMPUNAVAIL = -18
    ETOOMANYCONNECTIONS = -19
    EWRITE = -20
    EREAD = -21
    EAPPKEY = -22
    ESSL = -23
    EGOINGOVERQUOTA = -24
    EROLLEDBACK = -25
    EMFAREQUIRED = -26
    EMASTERONLY = -27
    EBUSINESSPASTDUE = -28
    EPAYWALL = -29
    ESUBUSERKEYMISSING = -30


_DESCRIPTIONS: dict[int, str] = {
    -1: "internal server error",
    -2: "invalid arguments",
    -3: "temporary congestion, try again",
    -4: "rate limit exceeded",
    -5: "request failed",
    -6: "too many requests or IPs on this resource",
    -7: "out of range",
    -8: "expired",
    -9: "object not found",
    -10: "circular linkage",
    -11: "access denied",
    -12: "already exists",
    -13: "incomplete",
    -14: "cryptographic or integrity error",
    -15: "session expired or invalid",
    -16: "blocked",
    -17: "over quota",
    -18: "temporarily unavailable",
    -19: "too many connections",
    -20: "write failed",
    -21: "read failed",
    -22: "invalid application key",
    -23: "SSL verification failed",
    -24: "not enough quota",
    -25: "request rolled back",
    -26: "two-factor authentication code required",
    -27: "not allowed for business sub-users",
    -28: "business account expired",
    -29: "over storage quota (paywall)",
    -30: "business sub-user key missing",
}


def code_name(code: int) -> str:
    """``-9`` -> ``"ENOENT"``; unknown numbers are shown as ``"E?"``."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return "E?"


def describe(code: int) -> str:
    """A short human description of a MEGA error number."""
    return _DESCRIPTIONS.get(code, "unknown error")


class MegaError(StoreError):
    """A MEGA failure carrying MEGA's error number in :attr:`code`.

    ``str(exc)`` is one line, e.g. ``"MEGA: -9 ENOENT: object not found (g)"``. The
    optional ``command`` is the API command name (never its arguments); ``detail``
    replaces the generic description when the caller knows better.
    """

    default_code: ClassVar[int] = ErrorCode.EINTERNAL
    transient: ClassVar[bool] = False

    def __init__(
        self, code: int | None = None, *, command: str | None = None, detail: str | None = None
    ) -> None:
        self.code: int = int(self.default_code if code is None else code)
        self.command = command
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"MEGA: {self.code} {code_name(self.code)}: {self.detail or describe(self.code)}"
        if self.command:
            text += f" ({self.command})"
        return text


class MegaTransient(MegaError, StoreUnavailable):
    """A failure that may go away by itself (after retries were exhausted)."""

    transient = True


class MegaTryAgain(MegaTransient):
    """EAGAIN (-3): the server is busy or the account is locked for a moment."""

    default_code = ErrorCode.EAGAIN


class MegaRateLimited(MegaTransient):
    """ERATELIMIT (-4): too many commands; slow down."""

    default_code = ErrorCode.ERATELIMIT


class MegaTooMany(MegaTransient):
    """ETOOMANY (-6)."""

    default_code = ErrorCode.ETOOMANY


class MegaTempUnavailable(MegaTransient):
    """ETEMPUNAVAIL (-18)."""

    default_code = ErrorCode.ETEMPUNAVAIL


class MegaTooManyConnections(MegaTransient):
    """ETOOMANYCONNECTIONS (-19)."""

    default_code = ErrorCode.ETOOMANYCONNECTIONS


class MegaNetworkError(MegaTransient):
    """The server could not be reached or gave no usable answer (after retries).

    Its :attr:`code` is ETEMPUNAVAIL (-18); ``detail`` says what went wrong (the
    exception type or the HTTP status), never a URL with a session id.
    """

    default_code = ErrorCode.ETEMPUNAVAIL

    def _message(self) -> str:
        text = f"MEGA unreachable: {self.detail or 'network error'}"
        if self.command:
            text += f" ({self.command})"
        return text


class MegaArgs(MegaError):
    """EARGS (-2): a malformed request (a bug on our side)."""

    default_code = ErrorCode.EARGS


class MegaFailed(MegaError):
    """EFAILED (-5)."""

    default_code = ErrorCode.EFAILED


class MegaRange(MegaError):
    """ERANGE (-7)."""

    default_code = ErrorCode.ERANGE


class MegaExpired(MegaError):
    """EEXPIRED (-8)."""

    default_code = ErrorCode.EEXPIRED


class UrlExpired(MegaExpired):
    """A storage-server URL is stale (HTTP 403/404): get a fresh one with ``g``/``u``."""

    def _message(self) -> str:
        return f"MEGA: storage URL expired or invalid ({self.detail or 'HTTP 403/404'})"


class MegaNotFound(MegaError):
    """ENOENT (-9)."""

    default_code = ErrorCode.ENOENT


class LoginFailed(MegaNotFound):
    """``us`` refused the credentials (MEGA answers ENOENT for a wrong password)."""

    def _message(self) -> str:
        return f"MEGA login failed: {self.detail or 'wrong e-mail or password'}"


class MegaCircular(MegaError):
    """ECIRCULAR (-10)."""

    default_code = ErrorCode.ECIRCULAR


class MegaAccessDenied(MegaError):
    """EACCESS (-11)."""

    default_code = ErrorCode.EACCESS


class MegaExists(MegaError):
    """EEXIST (-12)."""

    default_code = ErrorCode.EEXIST


class MegaIncomplete(MegaError):
    """EINCOMPLETE (-13)."""

    default_code = ErrorCode.EINCOMPLETE


class MegaKeyError(MegaError, IntegrityError):
    """EKEY (-14): a key, attribute or content MAC did not check out."""

    default_code = ErrorCode.EKEY


class MegaSessionExpired(MegaError):
    """ESID (-15): the session is gone; log in again."""

    default_code = ErrorCode.ESID


class MegaBlocked(MegaError):
    """EBLOCKED (-16): the account or resource is blocked by MEGA."""

    default_code = ErrorCode.EBLOCKED


class MegaOverQuota(MegaError):
    """EOVERQUOTA (-17) / EGOINGOVERQUOTA (-24): storage quota exhausted."""

    default_code = ErrorCode.EOVERQUOTA


class MegaTransferQuota(MegaOverQuota):
    """A storage server answered HTTP 509: the transfer quota is used up.

    :attr:`time_left` is the server's ``X-MEGA-Time-Left`` in seconds, if it sent one.
    """

    def __init__(self, time_left: int | None = None, *, command: str | None = None) -> None:
        self.time_left = time_left
        wait = f"; retry in {time_left} s" if time_left is not None else ""
        super().__init__(command=command, detail=f"transfer quota exceeded{wait}")


class MegaMfaRequired(MegaError):
    """EMFAREQUIRED (-26): the account needs a two-factor code."""

    default_code = ErrorCode.EMFAREQUIRED


_CLASSES: dict[int, type[MegaError]] = {
    -2: MegaArgs,
    -3: MegaTryAgain,
    -4: MegaRateLimited,
    -5: MegaFailed,
    -6: MegaTooMany,
    -7: MegaRange,
    -8: MegaExpired,
    -9: MegaNotFound,
    -10: MegaCircular,
    -11: MegaAccessDenied,
    -12: MegaExists,
    -13: MegaIncomplete,
    -14: MegaKeyError,
    -15: MegaSessionExpired,
    -16: MegaBlocked,
    -17: MegaOverQuota,
    -18: MegaTempUnavailable,
    -19: MegaTooManyConnections,
    -24: MegaOverQuota,
    -26: MegaMfaRequired,
}


def mega_error(code: int, *, command: str | None = None, detail: str | None = None) -> MegaError:
    """The exception instance for MEGA error number ``code`` (the most specific class)."""
    cls = _CLASSES.get(int(code), MegaError)
    return cls(int(code), command=command, detail=detail)


_ERRNO: dict[int, int] = {
    -1: _errno.EIO,
    -2: _errno.EINVAL,
    -3: _errno.EAGAIN,
    -4: _errno.EAGAIN,
    -5: _errno.EIO,
    -6: _errno.EAGAIN,
    -7: _errno.EINVAL,
    -8: _errno.EIO,
    -9: _errno.ENOENT,
    -10: _errno.EINVAL,
    -11: _errno.EACCES,
    -12: _errno.EEXIST,
    -13: _errno.EIO,
    -14: _errno.EIO,
    -15: _errno.EACCES,
    -16: _errno.EACCES,
    -17: _errno.EDQUOT,
    -18: _errno.EAGAIN,
    -19: _errno.EAGAIN,
    -20: _errno.EIO,
    -21: _errno.EIO,
    -24: _errno.EDQUOT,
    -26: _errno.EACCES,
    -29: _errno.EDQUOT,
}


def errno_for(exc: BaseException) -> int:
    """The errno a filesystem caller should see for ``exc`` (EIO when unknown).

    MEGA errors map by code (EOVERQUOTA -> EDQUOT, ENOENT -> ENOENT, EACCESS -> EACCES,
    EAGAIN/ERATELIMIT that outlived the retries -> EAGAIN, EKEY -> EIO, ...). A network
    failure and an expired storage URL that could not be refreshed are EIO. Anything
    else goes to :func:`megafs.errors.errno_for`.
    """
    if isinstance(exc, MegaNetworkError | UrlExpired):
        return _errno.EIO
    if isinstance(exc, MegaKeyError):
        return _errno.EIO
    if isinstance(exc, MegaError):
        return _ERRNO.get(exc.code, _errno.EIO)
    return _project_errno_for(exc)
