"""What the HTTP stores (S3, WebDAV, MEGA) share about httpx.

Importing this module sets how much httpcore asks of the socket per read of a
response: 64 KiB by default, 1 MiB here. A chunk arrives as a response of up to
4 MiB, and every read passes through httpcore, h11 and httpx on the event loop's
thread (the thread that also answers the kernel): with 64 KiB reads that was most
of that thread's time in a cold read from S3 (measured, 1 GiB through a 20 ms
loopback proxy: daemon CPU 8.2-9.0 -> 5.4-6.0 s with whole-chunk read-ahead and
these reads together). A read returns what has arrived, so small responses are
not delayed. httpcore has no per-client setting for it; the class attribute is
what its connections read.
"""

from __future__ import annotations

from typing import Final

import httpcore

#: Bytes asked of the socket per read of a response body.
READ_SIZE: Final = 1 << 20

for _cls in (httpcore.AsyncHTTP11Connection, httpcore.HTTP11Connection):
    if getattr(_cls, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
        _cls.READ_NUM_BYTES = READ_SIZE
