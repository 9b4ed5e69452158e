"""The kubelet's container supervision: restarts by ``restartPolicy``, and readiness.

A container whose process exits is handled as the kubelet handles it (restart policy,
back-off, readiness): :class:`ContainerSupervisor`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import proc
from .errors import K8sNetLabError
from .periodic import Periodic

if TYPE_CHECKING:  # pragma: no cover
    from .pod import Pod

log = logging.getLogger(__name__)

POLL_S = 0.2
BACKOFF_INITIAL_S = 10.0     # kubelet's CrashLoopBackOff: 10 s doubling ...
BACKOFF_MAX_S = 300.0        # ... up to five minutes
BACKOFF_RESET_S = 600.0      # a container that ran this long starts the back-off over


def should_restart(policy: str, returncode: int) -> bool:
    """The kubelet's decision for an exited container (returncode < 0: killed by a signal)."""
    return policy == "Always" or (policy == "OnFailure" and returncode != 0)


def next_backoff(current: float, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_MAX_S) -> float:
    """The delay after the one just used: 0 -> initial -> doubled, capped."""
    return min(cap, initial if current <= 0 else current * 2)


@dataclass
class ContainerState:
    started: float                  # monotonic time of the last start
    backoff: float = 0.0            # the delay the next restart waits (0: at once)
    restart_at: float | None = None  # set while the container waits in back-off
    gave_up: bool = False           # the policy keeps it down


class ContainerSupervisor(Periodic):
    """Restarts exited containers and keeps every pod's ``ready`` flag.

    A container whose process exits is handled as the kubelet handles it:

    - ``restartPolicy`` (the pod's; default ``Always``): ``Always`` restarts it, ``OnFailure``
      only after a non-zero exit (or a signal), ``Never`` leaves it down;
    - the back-off is the kubelet's CrashLoopBackOff: the first restart at once, then 10 s,
      20 s, 40 s ... capped at 300 s; a container that ran for 10 minutes starts over;
    - meanwhile the pod is **not ready**: it leaves the endpoints of its Services (the add-ons
      hear of it through ``readiness_changed``) until the restarted container runs again and
      every TCP ``containerPort`` it declares listens (a tcpSocket readiness probe), then it
      returns.

    One thread per cluster polls every pod's containers (``poll()`` of the process: no system
    call per pod beyond ``waitpid``; the ports are looked at only while a pod is not ready).
    A pod being deleted (``Pod.stopping``) is left alone; restarts and ``stop_containers`` take
    the pod's ``lifecycle`` lock in turn, so a container never comes back after its pod stopped.
    """

    thread_name = "kubelet-containers"

    def __init__(self, pods: Callable[[], dict[str, "Pod"]], log_dir: Path,
                 readiness_changed: Callable[[list["Pod"]], None], poll: float = POLL_S,
                 backoff_initial: float = BACKOFF_INITIAL_S, backoff_max: float = BACKOFF_MAX_S):
        super().__init__()
        self.pods, self.log_dir, self.readiness_changed = pods, log_dir, readiness_changed
        self.poll, self.backoff_initial, self.backoff_max = poll, backoff_initial, backoff_max
        self.states: dict[tuple[str, str], ContainerState] = {}   # (pod sandbox id, container)
        self.events: deque[tuple[float, str, str, str]] = deque(maxlen=1000)   # (t, pod, container, what)

    def interval(self) -> float:
        return self.poll

    def tick(self) -> object:
        return self.check_once()

    def _event(self, pod: "Pod", container: str, what: str) -> None:
        self.events.append((time.monotonic(), pod.name, container, what))
        log.info("kubelet: pod %s container %s: %s", pod.name, container, what)

    def check_once(self) -> list["Pod"]:
        """One pass over every pod; returns the pods whose readiness changed (and tells)."""
        changed = []
        now = time.monotonic()
        live = set()
        for pod in list(self.pods().values()):
            if pod.stopping or pod.result is None:
                continue
            live.add(pod.container_id)
            with pod.lifecycle:
                if pod.stopping:
                    continue
                ready = self._pod(pod, now)
            if ready != pod.ready:
                pod.ready = ready
                self._event(pod, "-", "ready" if ready else "not ready")
                changed.append(pod)
        self.states = {k: v for k, v in self.states.items() if k[0] in live}
        if changed:
            self.readiness_changed(changed)
        return changed

    def _pod(self, pod: "Pod", now: float) -> bool:
        """Handle the pod's exited containers; return whether the pod is ready now."""
        ready = True
        for spec in pod.spec.containers:
            cont = pod.containers.get(spec.name)
            if cont is None:
                continue                      # no command: nothing runs for it
            st = self.states.setdefault((pod.container_id, spec.name), ContainerState(now))
            code = cont.process.poll()
            if code is None:
                if not pod.ready and not all(proc.listening(cont.pid, p.container_port)
                                             for p in spec.ports if p.protocol == "TCP"):
                    ready = False             # restarted, not serving yet
                continue
            ready = False
            if st.gave_up:
                continue
            if st.restart_at is None:        # it just exited
                self._event(pod, spec.name, f"exited with status {code}")
                if not should_restart(pod.spec.restart_policy, code):
                    st.gave_up = True
                    self._event(pod, spec.name, f"not restarted (restartPolicy {pod.spec.restart_policy})")
                    continue
                if now - st.started >= BACKOFF_RESET_S:
                    st.backoff = 0.0
                st.restart_at = now + st.backoff
                if st.backoff:
                    self._event(pod, spec.name, f"back-off {st.backoff:.0f} s")
            if now < st.restart_at:
                continue
            try:
                pod.start_container(spec, self.log_dir)
            except K8sNetLabError as e:
                self._event(pod, spec.name, f"restart failed: {e}")
            pod.restarts[spec.name] = pod.restarts.get(spec.name, 0) + 1
            st.started, st.restart_at = now, None
            st.backoff = next_backoff(st.backoff, self.backoff_initial, self.backoff_max)
            self._event(pod, spec.name, f"restarted ({pod.restarts[spec.name]})")
        return ready
