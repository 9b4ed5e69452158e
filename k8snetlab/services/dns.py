"""Cluster DNS: ``name.namespace.svc.cluster.local`` answered by dnsmasq in a pod.

What a kubeadm cluster has, built from the same parts (a dnsmasq pod behind the kube-dns
Service, every pod's resolv.conf pointing at it): :class:`ClusterDNS`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .. import proc
from ..errors import K8sNetLabError
from .model import DNS_OFFSET, Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from ..pod import Pod

log = logging.getLogger(__name__)

DOMAIN = "cluster.local"
NAMESPACE = "kube-system"
NAME = "kube-dns"
CONTAINER = "dnsmasq"
LABELS = {"k8s-app": NAME}
TTL_S = 5                       # CoreDNS's default TTL for Service records
ROOT_RESOLV_CONF = "/etc/resolv.conf"


# ---------------------------------------------------------------------------------- rendering
def dns_ip(service_cidr: Any) -> str:
    """The cluster DNS address: the service CIDR's tenth address (``10.96.0.10``)."""
    return str(ipaddress.IPv4Network(str(service_cidr)).network_address + DNS_OFFSET)


def records(snap: Snapshot, domain: str = DOMAIN) -> list[tuple[str, str]]:
    """(name, IPv4 address) pairs, sorted: a Service's ClusterIP, or the ready pod IPs of a
    headless Service (none while it has no ready pod: the name is then NXDOMAIN)."""
    out: set[tuple[str, str]] = set()
    for svc in snap.services:
        name = f"{svc.name}.{svc.namespace}.svc.{domain}"
        if svc.headless:
            out.update((name, e.ip) for e in snap.endpoints.get(svc.key, ()))
        elif svc.cluster_ip:
            out.add((name, svc.cluster_ip))
    return sorted(out)


def render_hosts(recs: Iterable[tuple[str, str]]) -> str:
    lines = ["# cluster DNS records, written by k8snetlab from the Services and their endpoints"]
    lines += [f"{ip} {name}" for name, ip in recs]
    return "\n".join(lines) + "\n"


def render_config(hosts_file: str | os.PathLike, domain: str = DOMAIN, ttl: int = TTL_S) -> str:
    """dnsmasq's configuration for the cluster DNS pod (a pure function: unit-tested)."""
    return "\n".join([
        "# cluster DNS (kube-dns), written by k8snetlab",
        "keep-in-foreground",
        "log-facility=-",          # to stderr: the container's log file
        "log-queries",
        "pid-file=",               # no pid file: it would clash with a dnsmasq of the machine
        "user=root",               # reads the records file in the cluster state dir on SIGHUP
        "port=53",
        "no-resolv",               # no upstream servers: nothing leaves the testbed
        "no-poll",
        "no-hosts",                # not the machine's /etc/hosts: only the records below
        f"addn-hosts={hosts_file}",
        f"local=/{domain}/",       # the cluster domain is ours: unknown names there are NXDOMAIN
        "address=/#/",             # and so is every other name (no forwarding at all)
        "domain-needed",
        "bogus-priv",
        f"local-ttl={ttl}",
        "cache-size=0",            # records change with every scale: always answer from the file
        "",
    ])


def render_resolv_conf(namespace: str, nameserver: str, domain: str = DOMAIN) -> str:
    """A pod's ``/etc/resolv.conf`` with ``dnsPolicy: ClusterFirst`` (as the kubelet writes it)."""
    return (f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
            f"nameserver {nameserver}\n"
            "options ndots:5\n")


def deployment(conf_file: str | os.PathLike) -> dict[str, Any]:
    ports = [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
             {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": dict(LABELS)},
            "spec": {"replicas": 1, "selector": {"matchLabels": dict(LABELS)},
                     "template": {"metadata": {"labels": dict(LABELS)},
                                  "spec": {"containers": [{"name": CONTAINER, "image": "dnsmasq",
                                                           "command": ["dnsmasq", f"--conf-file={conf_file}"],
                                                           "ports": ports}]}}}}


def service(cluster_ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": dict(LABELS)},
            "spec": {"clusterIP": cluster_ip, "selector": dict(LABELS),
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                               {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}}


# ---------------------------------------------------------------------------------- runtime
class ClusterDNS:
    """The cluster DNS of one cluster (created and driven by the Services add-on).

    What a kubeadm cluster has, built from the same parts:

    - a Deployment ``kube-dns`` in namespace ``kube-system`` whose pod runs a real DNS server
      (dnsmasq; CoreDNS is not packaged for Debian, dnsmasq is, and answering from a hosts file
      is all the Service records need), and a Service ``kube-dns`` at the service CIDR's tenth
      address (``10.96.0.10`` by default), ports 53/UDP ``dns`` and 53/TCP ``dns-tcp``. Queries
      reach the pod through kube-proxy like any Service traffic, in every kube-proxy mode.
    - the records, rendered from each :class:`~.model.Snapshot` into a hosts file that dnsmasq
      reads with ``--addn-hosts`` (re-read on SIGHUP, sent only when the records changed):
      ``<name>.<ns>.svc.cluster.local`` -> the ClusterIP; for a headless Service one line per
      ready pod, so the name gives the pod IPs and follows scaling.
    - nothing leaves the testbed: no upstream server (``--no-resolv``), ``cluster.local`` is
      answered from the records only, every other name is NXDOMAIN.
    - each pod resolves through it, as the kubelet arranges with ``dnsPolicy: ClusterFirst``: its
      own ``resolv.conf`` (``nameserver 10.96.0.10``, ``search <ns>.svc.cluster.local
      svc.cluster.local cluster.local``, ``options ndots:5``), kept in the cluster's state
      directory and bind-mounted over ``/etc/resolv.conf`` *inside the pod's mount namespace*.
      Pod sandboxes are started by ``mnexec -n``, which gives each one a mount namespace of its
      own with ``/`` private; the mount is made private again before binding, so nothing
      propagates to the machine's namespace, whose ``/etc/resolv.conf`` is never touched. The
      pod's containers, ``pod.run(...)`` and ``pod.cmd(...)`` all run in that namespace and see
      the file; the mount goes away with the pod.

    The records are written before the DNS pod starts, so it answers from its first query; a pod
    gets its ``resolv.conf`` right after its containers started (the add-on hook), a few
    milliseconds later than a kubelet would write it.
    """

    def __init__(self, addon: Any):
        self.addon = addon
        self.cluster = addon.cluster
        self.ip = dns_ip(self.cluster.spec.network.service_cidr)
        self.dir = Path(self.cluster.state.path) / "dns"
        self.hosts_file = self.dir / "hosts"
        self.conf_file = self.dir / "dnsmasq.conf"
        self._written = ""                      # the hosts file's content as last written
        self._loaded: dict[int, str] = {}       # dnsmasq PID -> digest of the records it has read
        self._mounted: set[tuple[str, int]] = set()   # (pod, sandbox PID) with our resolv.conf

    def start(self) -> None:
        proc.require("dnsmasq")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(render_config(self.hosts_file))
        self._write_hosts(self.addon.snapshot())
        self.addon.add_service(service(self.ip))
        self.cluster.add_pod(deployment(self.conf_file))   # pods_added gives the pods their resolv.conf
        self.pods_added(list(self.cluster.pods.values()))
        log.info("cluster DNS at %s (dnsmasq in %s)", self.ip,
                 ", ".join(p.name for p in self.dns_pods()) or "no pod")

    def stop(self) -> None:
        """Nothing to undo outside the pods: the DNS pod is stopped with the others, and each
        pod's bind mount lives only in that pod's mount namespace."""
        self._mounted.clear()
        self._loaded.clear()

    # -- records ---------------------------------------------------------------------------
    def sync(self, snap: Snapshot) -> None:
        self._write_hosts(snap)
        digest = hashlib.sha1(self._written.encode()).hexdigest()
        for pod in self.dns_pods():
            cont = pod.containers.get(CONTAINER)
            if cont is None or not cont.running() or self._loaded.get(cont.pid) == digest:
                continue
            # dnsmasq installs its SIGHUP handler before it opens port 53: until it listens, a
            # SIGHUP would kill it, and it reads the (already written) file at start anyway
            if proc.listening(cont.pid, 53):
                cont.process.send_signal(signal.SIGHUP)
                self._loaded[cont.pid] = digest

    def _write_hosts(self, snap: Snapshot) -> None:
        text = render_hosts(records(snap))
        if text != self._written:
            tmp = self.hosts_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.hosts_file)       # dnsmasq never reads a half-written file
            self._written = text

    def dns_pods(self) -> list["Pod"]:
        owner = f"Deployment/{NAME}"
        return [p for p in self.cluster.pods.values()
                if p.spec.owner == owner and p.spec.namespace == NAMESPACE]

    # -- pods' resolv.conf -----------------------------------------------------------------
    def pods_added(self, pods: list["Pod"]) -> None:
        live = {(p.name, p.pid) for p in self.cluster.pods.values()}
        self._mounted &= live                  # forget pods that are gone
        for pod in pods:
            if (pod.name, pod.pid) not in self._mounted:
                self.give_resolv_conf(pod)

    def pod_removing(self, pod: "Pod") -> None:
        self._mounted.discard((pod.name, pod.pid))

    def resolv_conf_path(self, pod: "Pod") -> Path:
        return Path(self.cluster.state.path) / "pods" / pod.name / "resolv.conf"

    def give_resolv_conf(self, pod: "Pod") -> None:
        """Write the pod's resolv.conf and bind-mount it over /etc/resolv.conf in the pod's
        own mount namespace (see :class:`ClusterDNS`)."""
        mine = os.readlink("/proc/self/ns/mnt")
        try:
            theirs = os.readlink(pod.mntns)
        except OSError as e:
            raise K8sNetLabError(f"pod {pod.name}: cannot read its mount namespace: {e.strerror}") from None
        if theirs == mine:     # never mount over the machine's own /etc/resolv.conf
            raise K8sNetLabError(f"pod {pod.name} shares the runtime's mount namespace: its resolv.conf "
                                 "would replace the machine's; the sandbox must be started with mnexec -n")
        if not os.path.exists(ROOT_RESOLV_CONF):
            raise K8sNetLabError(f"{ROOT_RESOLV_CONF} does not exist on this machine: a pod's resolv.conf is "
                                 f"bind-mounted over it; create an empty one (touch {ROOT_RESOLV_CONF})")
        path = self.resolv_conf_path(pod)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_resolv_conf(pod.spec.namespace, self.ip))
        pod.run(["mount", "--make-rprivate", "/"])
        pod.run(["mount", "--bind", str(path), ROOT_RESOLV_CONF])
        self._mounted.add((pod.name, pod.pid))
