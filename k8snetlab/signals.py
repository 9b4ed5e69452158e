"""SIGINT and SIGTERM: both lead to a full teardown, whenever they arrive.

Python runs a signal handler in the main thread between any two bytecodes, also inside a
fork handler (``logging``'s ``_releaseLock`` after every ``fork``) or half-way through
building a link: an exception raised there is lost ("Exception ignored in ...") or leaves a
lock held and the process hung. So the handler here never raises at an arbitrary point. It
records the signal and wakes whoever waits; the exception (``KeyboardInterrupt``, which every
teardown path already handles) is raised at a safe point (which ones: :func:`install`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_S = 0.05

_received: int | None = None
_depth = 0                       # nesting of deferred() regions in the main thread
_teardowns = 0                   # of those, teardown regions: poll() does nothing inside
_wake = threading.Event()
_installed = False


def install() -> dict[int, Any]:
    """Handle SIGINT and SIGTERM alike (call from the main thread of a command); returns the
    handlers it replaced, for :func:`restore`.

    - inside a :func:`deferred` region (a cluster's start and stop), at :func:`checkpoint` calls
      the region makes between steps, or when the region ends;
    - outside one, at once, unless the main thread is in ``logging`` or a fork handler: then
      the signal is delivered again a moment later.

    :func:`install` also restores SIGINT when the process started with it ignored (a job started
    with ``&`` from a script), so Ctrl-C and ``kill -INT`` work as SIGTERM does.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)    # also un-ignores SIGINT inherited as SIG_IGN
    _installed = True
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced, and forget any pending signal (for a
    caller that runs a command in its own process, e.g. a test calling ``cli.main([...])``)."""
    global _installed, _received, _depth, _teardowns
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _installed, _received, _depth, _teardowns = False, None, 0, 0
    _wake.clear()


def received() -> int | None:
    """The stop signal received and not yet acted on, if any."""
    return _received


def _unsafe(frame: FrameType | None) -> bool:
    """Is the main thread inside logging or a fork handler, where an exception is lost?"""
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if mod == "logging" or mod.startswith("logging.") or \
                (mod == "threading" and frame.f_code.co_name in ("_after_fork", "_at_fork_reinit")):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum
    _wake.set()
    if _depth > 0:
        return                          # the region acts at its next checkpoint
    if _unsafe(frame):
        timer = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    checkpoint()


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` if a stop signal arrived (a safe point)."""
    global _received
    if _received is not None:
        _received = None
        _wake.clear()
        raise KeyboardInterrupt


def poll() -> None:
    """:func:`checkpoint` from the main thread, nothing from any other nor inside a teardown
    region (``deferred(teardown=True)``): for loops that wait (a speaker's start, BGP
    convergence, a pool of kubelet threads), so that a stop signal during a long step of a
    start takes effect within a moment, not when the step ends, and one during a teardown
    once it is complete, never half-way."""
    if _teardowns == 0 and threading.current_thread() is threading.main_thread():
        checkpoint()


@contextlib.contextmanager
def deferred(teardown: bool = False) -> Iterator[None]:
    """A region where a stop signal only takes effect at :func:`checkpoint` or at its end
    (a normal end: an exception already on its way is not replaced); in a ``teardown``
    region :func:`poll` does nothing either."""
    global _depth, _teardowns
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    _teardowns += teardown
    try:
        yield
    finally:
        _depth -= 1
        _teardowns -= teardown
    if _depth == 0:
        checkpoint()


def quiet() -> None:
    """From now on a stop signal is only recorded (the command is ending anyway)."""
    global _depth
    _depth += 1


def ignore() -> None:
    """Ignore stop signals from now on (a command that has finished its teardown and exits:
    Python resets its own handlers to the default while it shuts down, and a signal then
    would end the process by the signal instead of its exit status)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def wait() -> None:
    """Block until a stop signal arrives, then raise ``KeyboardInterrupt``."""
    while True:
        _wake.wait(1.0)
        checkpoint()


def deferring(fn: Callable[..., T] | None = None, *, teardown: bool = False) -> Any:
    """Run ``fn`` as a :func:`deferred` region: ``@deferring`` (``Cluster.start``),
    ``@deferring(teardown=True)`` (``Cluster.stop``)."""
    def wrap(f: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with deferred(teardown):
                return f(*args, **kwargs)
        return wrapper
    return wrap(fn) if fn is not None else wrap
