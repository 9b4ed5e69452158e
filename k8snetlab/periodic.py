"""A daemon thread that calls ``tick()`` every ``interval()`` seconds until ``stop()``: the
loop of the node agents' resync and the kubelet's container supervision."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Subclass it (giving ``thread_name``, ``interval()`` and ``tick()``) or pass them in.
    A tick that raises is logged and the loop goes on (a reconcile loop must not die
    silently). ``start()`` after ``stop()`` runs it again."""

    thread_name = "periodic"

    def __init__(self, thread_name: str | None = None, interval: Callable[[], float] | None = None,
                 tick: Callable[[], object] | None = None) -> None:
        if thread_name is not None:
            self.thread_name = thread_name
        if interval is not None:
            self.interval = interval    # type: ignore[method-assign]
        if tick is not None:
            self.tick = tick            # type: ignore[method-assign]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def interval(self) -> float:
        raise NotImplementedError

    def tick(self) -> object:
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval()):
            try:
                self.tick()
            except Exception as e:
                log.warning("%s: %s", self.thread_name, e)
