"""An advisory lock file held for the length of a run: a second run on the same output is refused at
once, naming the process holding it, instead of both writing it (checkpoints, eval reports)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held(lock: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``lock`` (created, with this process id in it, and removed at the end); when another process
    holds it, raise ``busy(holder_pid)``. Without POSIX locks (Windows) the run is unguarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    f = open(lock, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise busy(f.read().strip() or "unknown") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
        lock.unlink(missing_ok=True)
