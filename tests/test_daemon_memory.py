"""The mount daemon reuses its chunk buffers (megafs.memory.keep_chunk_buffers).

Every 4 MiB written through a mount passes through a chunk buffer and a sealed copy.
With glibc's default settings the heap's top is trimmed whenever a few of them are
freed together, and the next ones fault their pages in again (measured on a 1 GiB
write through a mount: ~150 page faults per MiB, 3.5 s; with the daemon's settings
~20 per MiB, 3.0 s, half the system time). The pattern is checked here in a child
process, so that the settings apply to a fresh allocator and not to pytest's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import resource, sys
    from megafs import memory

    if sys.argv[1] == "tuned":
        assert memory.keep_chunk_buffers()
    CHUNK = 4 << 20

    def faults_per_round(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            # A few chunk buffers in use at once, then freed together.
            bufs = [bytearray(CHUNK) for _ in range(3)]
            for b in bufs:
                b[::4096] = b"x" * (CHUNK // 4096)
            del bufs
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

    faults_per_round(2)  # the heap grows to its working size
    print(faults_per_round(20))
    """
)


def _faults(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True
    )
    return float(out.stdout)


def test_chunk_buffers_are_reused_not_faulted_in_again() -> None:
    # Without the settings the pattern faults pages in every round (~200 here).
    assert _faults("default") > 100
    assert _faults("tuned") < 10
