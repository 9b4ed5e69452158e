"""White-box monitoring of a running cluster: per node and pod counters for Prometheus.

``k8snetlab up FILE --metrics 127.0.0.1:PORT`` serves ``/metrics`` in Prometheus' text
format (``prometheus_client``) while the cluster runs. Every scrape reads the counters
afresh, so nothing is cached or sampled in between:

- traffic and errors per host (node, pod, router) and interface, from ``/proc/<pid>/net/dev``
  of a process in its namespace: ``k8snetlab_interface_{receive,transmit}_{bytes,packets,drops}_total``;
- TCP retransmitted segments per host (``/proc/<pid>/net/snmp``):
  ``k8snetlab_tcp_retransmitted_segments_total``;
- saturation: the machine's CPU seconds by mode (``k8snetlab_cpu_seconds_total``, softirq
  included) and, on shaped links, ``k8snetlab_qdisc_drops_total`` and ``k8snetlab_qdisc_backlog_bytes``.

Only loopback addresses are served: the emulated network never talks to the outside.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Iterator

from . import hoststat
from .errors import SpecError

log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9100`` -> ("127.0.0.1", 9100); loopback only."""
    host, sep, port = text.rpartition(":")
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
        num = int(port)
    except ValueError:
        addr, num = None, 0
    if not sep or addr is None or not 0 < num < 65536:
        raise SpecError(f"--metrics {text!r}: write ADDRESS:PORT, e.g. --metrics 127.0.0.1:9100")
    if not addr.is_loopback:
        raise SpecError(f"--metrics {text!r}: serve on a loopback address (127.0.0.1): the testbed "
                        "exposes nothing beyond this machine")
    return str(addr), num


class ClusterCollector:
    """A prometheus_client collector reading one cluster's counters at scrape time."""

    def __init__(self, cluster: Any):
        self.cluster = cluster

    def _hosts(self) -> Iterator[tuple[str, Any]]:
        c = self.cluster
        for kind, hosts in (("node", c.nodes), ("pod", c.pods), ("router", c.routers), ("host", c.hosts)):
            for h in list(hosts.values()):
                yield kind, h

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        name = self.cluster.spec.name
        labels = ["cluster", "kind", "name", "interface"]
        fams = {f"{d}_{what}": CounterMetricFamily(f"k8snetlab_interface_{d}_{what}",
                                                   f"{what} {d}d by the interface", labels=labels)
                for d in ("receive", "transmit") for what in ("bytes", "packets", "drops")}
        retrans = CounterMetricFamily("k8snetlab_tcp_retransmitted_segments_total",
                                      "TCP segments retransmitted in the host's namespace",
                                      labels=["cluster", "kind", "name"])
        for kind, h in self._hosts():
            try:
                ns = hoststat.ns_counters(h.netns)
            except (OSError, ValueError):
                continue                              # a pod that just left
            for ifname, cnt in ns.ifaces.items():
                lv = [name, kind, h.name, ifname]
                for key, value in (("receive_bytes", cnt.rx_bytes), ("receive_packets", cnt.rx_packets),
                                   ("receive_drops", cnt.rx_drop), ("transmit_bytes", cnt.tx_bytes),
                                   ("transmit_packets", cnt.tx_packets), ("transmit_drops", cnt.tx_drop)):
                    fams[key].add_metric(lv, value)
            retrans.add_metric([name, kind, h.name], ns.retrans_segs)
        yield from fams.values()
        yield retrans
        cpu = CounterMetricFamily("k8snetlab_cpu_seconds_total", "CPU seconds of the whole machine by mode",
                                  labels=["mode"])
        t = hoststat.cpu_times()
        for mode in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"):
            cpu.add_metric([mode], getattr(t, mode))
        yield cpu
        shaped = list(getattr(self.cluster, "shaped_links", []))
        if shaped:
            from . import shaping
            drops = CounterMetricFamily("k8snetlab_qdisc_drops_total", "packets dropped on a shaped link",
                                        labels=["cluster", "device"])
            backlog = GaugeMetricFamily("k8snetlab_qdisc_backlog_bytes", "bytes queued on a shaped link",
                                        labels=["cluster", "device"])
            for netns, dev in shaped:
                try:
                    d, b = shaping.qdisc_counters(netns, dev)
                except Exception:                     # the link is going away
                    continue
                drops.add_metric([name, dev], d)
                backlog.add_metric([name, dev], b)
            yield drops
            yield backlog
        up = GaugeMetricFamily("k8snetlab_pods", "pods of the cluster", labels=["cluster"])
        up.add_metric([name], len(self.cluster.pods))
        yield up


def serve(cluster: Any, listen: str):
    """Serve the cluster's metrics on ``listen`` (a daemon thread); returns the server, whose
    ``shutdown()`` stops it."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        from .errors import ToolMissing
        raise ToolMissing("prometheus_client", "prometheus_client", "PyPI") from None
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(cluster))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise SpecError(f"--metrics {listen}: cannot listen there: {e.strerror or e}") from None
    log.info("metrics of %s on http://%s:%d/metrics", cluster.spec.name, host, port)
    return server
