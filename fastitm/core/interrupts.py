"""SIGTERM handled like Ctrl-C: save, then exit.

Batch schedulers (SLURM, Kubernetes) and ``torchrun`` (when another rank dies) stop a job with SIGTERM
and kill it a little later; by default SIGTERM ends Python at once, so a run would lose everything since
its last periodic save. Inside :func:`terminate_as_interrupt` (the eval runner, fine-tuning, the CLI)
SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so the code that saves on Ctrl-C saves on
SIGTERM too; inside the engine's deferred section a first SIGTERM, like a first Ctrl-C, lets the batch in
flight finish. Signals can only be caught in the main thread: elsewhere nothing changes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (the process was asked to stop): raised where Ctrl-C would raise KeyboardInterrupt."""


# The signals this process turned into interrupts, in order (the CLI's exit code says which came).
received: list[int] = []


def exit_code() -> int:
    """The shell's code for the last interrupt: 143 after SIGTERM, else 130 (Ctrl-C)."""
    return 128 + int(received[-1]) if received else 130


def _on_term(signum, frame) -> None:
    received.append(signum)
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred(message: str = "stopping after the batch in flight") -> Iterator[list[int]]:
    """While inside, a first Ctrl-C or SIGTERM only sets ``flag[0]`` to the signal's number (the caller
    stops at its next safe point); a second one interrupts at once. Outside the main thread nothing
    changes (the flag stays 0)."""
    import sys

    flag = [0]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        received.append(signum)
        if flag[0]:
            raise Terminated(f"signal {signal.Signals(signum).name}") if signum == signal.SIGTERM \
                else KeyboardInterrupt
        flag[0] = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nfastitm: {message} ({again} again to stop at once)", file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
