"""The node agents' periodic reconcile: what was deleted by hand comes back.

flanneld checks its routes every 10 s (host-gw's route check) and calico-node's Felix
refreshes its routes every ``routeRefreshInterval`` (90 s by default): an agent that only
reacts to node-list changes leaves a node broken for good once someone runs ``ip route del``
on it. One :class:`AgentResync` per cluster does the same for every node, every
``period`` seconds (the mode's option, see each mode's ``resync_period``):

1. it reads what the node has, once per node and kind (one route dump, one neighbour and
   one FDB dump for VXLAN, the BPF maps for eBPF IPIP: no per-peer requests when all is well),
2. asks the mode which peers lack something (:meth:`~.base.Mode.peers_to_repair`), and
3. runs the mode's own ``add_peer`` for those only, the verb that made them in the first
   place (replace semantics: repairing twice is harmless).

It shares one lock with the cluster's node-list changes (``add_node``/``remove_node``), taken
per node, so it never re-adds the routes of a node that is leaving and a join waits for one
node's reconcile at most. ``stop()`` ends the thread before the
node agents are stopped.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

from ..errors import K8sNetLabError
from ..netutil import Netns
from ..periodic import Periodic

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import NodeHost
    from .base import Mode

log = logging.getLogger(__name__)


class AgentResync(Periodic):
    """A thread that reconciles every node's inter-node state every ``period`` seconds."""

    def __init__(self, mode: "Mode", nodes: Callable[[], dict[str, "NodeHost"]], period: float,
                 lock: threading.RLock):
        super().__init__()
        self.mode, self.nodes, self.period, self.lock = mode, nodes, period, lock
        self.thread_name = f"{mode.name}-agent-resync"
        self.rounds = 0                              # reconcile rounds done
        self.repaired: dict[str, list[str]] = {}     # node -> peers repaired in the last round
        self._said: set[str] = set()

    def interval(self) -> float:
        return self.period

    def tick(self) -> object:
        return self.resync_once()

    def resync_once(self) -> dict[str, list[str]]:
        """One round over every node; returns {node: [peers repaired]} (only nodes with any).

        The lock is taken per node, not for the round: at 100 nodes a round is a hundred
        route dumps, and a node joining or leaving waits for one node's, not for all."""
        out: dict[str, list[str]] = {}
        for name in list(self.nodes()):
            with self.lock:
                if self.stopping:
                    return out
                nodes = self.nodes()
                node = nodes.get(name)
                if node is None:            # it left while the round went on
                    continue
                peers = [p for n, p in nodes.items() if n != name]
                try:
                    with Netns(node.netns, name) as ns:
                        fixed = self.mode.resync_node(node, ns, peers)
                    self._said.discard(name)
                except K8sNetLabError as e:        # keep going; say it once per node
                    if name not in self._said:
                        log.warning("%s agent resync on %s: %s", self.mode.name, name, e)
                        self._said.add(name)
                    continue
            if fixed:
                log.info("%s agent on %s: repaired the state for %s", self.mode.name, name, ", ".join(fixed))
                out[name] = fixed
        self.repaired = out
        self.rounds += 1
        return out
