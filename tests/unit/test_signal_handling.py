"""k8snetlab.signals without a cluster: where a stop signal takes effect.

The integration test (tests/integration/test_signals.py) sends signals to ``k8snetlab up``;
these pin the rules it relies on: inside a deferred region nothing is raised until a
checkpoint; outside one the interrupt comes at once, except inside logging (a fork handler),
where it comes a moment later; SIGINT inherited as ignored is handled again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_harness import signals_installed
from k8snetlab import signals


@pytest.fixture
def installed():
    with signals_installed():
        yield


def _deliver(sig: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(50):           # the handler runs at the next bytecode boundary
        time.sleep(0.001)


def test_inside_a_deferred_region_only_checkpoints_raise(installed):
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            _deliver()
            assert signals.received() == signal.SIGTERM     # recorded, nothing raised yet
            signals.checkpoint()
            pytest.fail("checkpoint did not raise")


def test_a_deferred_region_raises_at_its_end(installed):
    reached_end_of_body = False
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            _deliver(signal.SIGINT)
            reached_end_of_body = True
    assert reached_end_of_body


def test_outside_a_region_the_interrupt_comes_at_once(installed):
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)
    assert signals.received() is None


def test_inside_logging_it_is_delivered_again_later(installed):
    # a function whose frame belongs to the logging module, as logging's _releaseLock does
    code = compile("def _releaseLock(handler, frame_getter):\n    handler(15, frame_getter())\n",
                   "logging/__init__.py", "exec")
    fake_logging: dict = {"__name__": "logging"}
    exec(code, fake_logging)
    fake_logging["_releaseLock"](signals._handler, sys._getframe)     # must not raise
    with pytest.raises(KeyboardInterrupt):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)


def test_sigint_ignored_at_start_is_handled_again():
    code = ("import os, signal, sys, time\n"
            "from k8snetlab import signals\n"
            "assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN\n"
            "signals.install()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert p.stdout.strip() == "interrupted", p.stderr
