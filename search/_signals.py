"""Ctrl-C and SIGTERM while the trials run: the first is handed to Ray Tune's own graceful stop,
a second Ctrl-C aborts at once."""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["StopRequest", "handling_signals"]


class StopRequest:
    """The first SIGINT or SIGTERM received while the trials run; a second SIGINT aborts at once.

    The first is handed on to Ray Tune's own graceful stop (its SIGUSR1 handler): Tune saves the
    experiment state with the running trials as unfinished, which is what `resume` continues,
    then stops them. `announce` runs first, so that a stopped trial can tell a signal from a
    halving stop."""

    def __init__(self, announce: Callable[[int], None]) -> None:
        self.signum: int | None = None
        self.announce = announce

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self.announce(signum)
        threading.Thread(target=_stop_tune, daemon=True).start()


def _stop_tune() -> None:
    """Raise SIGUSR1 once Tune's handler for it is installed (at the start of its loop)."""
    deadline = time.monotonic() + 600
    while signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal.raise_signal(signal.SIGUSR1)


@contextlib.contextmanager
def handling_signals(request: StopRequest) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    previous = {signum: signal.signal(signum, request) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not an earlier Tune run's handler
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
