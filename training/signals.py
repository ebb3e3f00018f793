"""Keep Ctrl+C / SIGTERM out of the few places where an interruption would leave the run inconsistent
(between the optimizer step and the step counter, while a checkpoint or summary is written): there
the signals are held back by the OS and delivered as soon as the block ends."""
from __future__ import annotations

import contextlib
import signal
import threading

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_deferred():
    # signal masks are per thread; Python runs handlers in the main thread only (and Windows has no masks)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
