#!/usr/bin/env python3
"""The Pod/Service lab, step by step: pods, the pause container, no NAT, a Service, kube-proxy.

Three nodes 192.168.1.129-131, container subnets 10.1.10.0/24, 10.1.20.0/24, 10.1.30.0/24 joined
by static routes, service range 20.1.0.0/16 (topologies/walkthrough.yaml). The script

1. deploys the one-pod ReplicationController ``frontend`` and shows, on its node, the pod's
   interfaces and that the infra ("pause") holder and the application container share one
   network namespace (same namespace inode);
2. shows that node-to-pod and pod-to-pod traffic needs no NAT and no port mapping (the server
   sees the client's own address; a capture on the wire shows the pod addresses);
3. creates Service ``frontend`` (port 80) and prints the node's service rules (userspace mode:
   REDIRECT and DNAT to the proxy's random port);
4. scales ``frontend`` to three pods over the nodes and, from the ``client`` pod, sends requests
   to the service IP while capturing on the node's physical interface and on the pod's veth;
5. checks what the lab describes: inside, the pod talks to the service IP; on the wire, a second
   TCP connection goes from the node's IP to a backend pod on another node; successive requests
   land on pods on different nodes;
6. repeats 3-5 with kube-proxy in ``iptables`` mode: one connection, DNAT, no proxy.

Every step prints what it did and what it saw. Under ``--out``: the captures (pcap, open them
in Wireshark), a CSV of every check and a Markdown report with the tables and packet summaries.

    sudo python experiments/walkthrough_pod_service.py [--quick] [--step] [--out DIR]
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, naming, proc, results  # noqa: E402
from k8snetlab.cluster import Cluster  # noqa: E402
from k8snetlab.validate import validate  # noqa: E402
from k8snetlab.errors import K8sNetLabError  # noqa: E402

NAME = "walkthrough_pod_service"
TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "walkthrough.yaml"
SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "frontend", "labels": {"name": "frontend"}},
           "spec": {"selector": {"name": "frontend"}, "ports": [{"port": 80, "targetPort": 80}]}}
# one HTTP request per connection; prints the backend's answer (its pod name) per line
GET_LOOP = ("import sys,urllib.request as u\n"
            "for i in range(int(sys.argv[2])):\n"
            "    print(u.urlopen('http://%s/' % sys.argv[1], timeout=5).read().decode().strip(), flush=True)\n")
PROBE_PORT = 7007
CHECK_COLUMNS = ("run_id", "timestamp", "kube_proxy", "step", "check", "expected", "observed", "result")


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0], default_repeat=1)
    p.set_defaults(topology=str(TOPOLOGY))
    p.add_argument("--step", action="store_true", help="pause for Enter between steps")
    p.add_argument("--requests", type=int, default=30, help="requests to the service per mode (default %(default)s)")
    p.add_argument("--modes", default="userspace,iptables",
                   help="kube-proxy modes to walk through, in order (default %(default)s)")
    return p


class Lab:
    """Holds the outputs: printed lines, the Markdown report, the CSV of checks."""

    def __init__(self, out: Path, run_id: str, pause: bool):
        self.out, self.run_id, self.pause = out, run_id, pause
        self.started = results.utc_timestamp()
        self.pcaps = out / f"{NAME}-{run_id}-pcap"
        self.pcaps.mkdir(parents=True, exist_ok=True)
        self.md: list[str] = [f"# The Pod/Service lab, run {run_id}", ""]
        self.rows: list[list[str]] = []
        self.failed: list[str] = []

    def step(self, title: str) -> None:
        if self.pause and not sys.stdin.isatty():
            print("--step: stdin is not a terminal, so the lab runs straight through without pausing")
            self.pause = False
        if self.pause:
            input("\n[press Enter for the next step] ")
        print(f"\n=== {title}")
        self.md += ["", f"## {title}", ""]

    def say(self, text: str, block: bool = False) -> None:
        print(text)
        self.md += (["```", text, "```"] if block else [text, ""])

    def check(self, mode: str, step: str, what: str, expected: str, observed: str, ok: bool) -> None:
        word = "ok" if ok else "FAILED"
        self.say(f"- [{word}] {what}: expected {expected}; saw {observed}")
        self.rows.append([self.run_id, results.utc_timestamp(), mode, step, what, expected, observed, "pass" if ok else "fail"])
        if not ok:
            self.failed.append(f"{mode} {step}: {what}")

    def write(self) -> tuple[Path, Path]:
        csv_path = self.out / f"{NAME}-{self.run_id}.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CHECK_COLUMNS)
            w.writerows(self.rows)
        md_path = self.out / f"{NAME}-{self.run_id}.md"
        from k8snetlab import framework
        how = "One pass per kube-proxy mode: a functional walkthrough, pass/fail checks, no rounds or intervals."
        md_path.write_text("\n".join(self.md + ["", *framework.provenance(self.started, how)]) + "\n")
        return csv_path, md_path


class Capture:
    """tcpdump inside a namespace, to a pcap file, stopped by us."""

    def __init__(self, host, ifname: str, pcap: Path, bpf: str):
        self.pcap = pcap
        self.p = host.popen_ns(["tcpdump", "-i", ifname, "-n", "-U", "--immediate-mode", "-s", "200", "-w", str(pcap), bpf],
                               what=f"capture {ifname}", log_path=pcap.with_suffix(".log"))
        deadline = time.monotonic() + 5
        while not pcap.exists() and time.monotonic() < deadline:   # tcpdump creates it once listening
            time.sleep(0.02)
        time.sleep(0.2)

    def stop(self) -> list:
        from scapy.all import rdpcap
        time.sleep(0.3)
        proc.end_child(self.p, grace=5)
        return list(rdpcap(str(self.pcap)))


def syns(packets) -> list[tuple[str, str, int]]:
    """(src, dst, dport) of every TCP SYN (not SYN-ACK)."""
    from scapy.all import IP, TCP
    out = []
    for p in packets:
        if IP in p and TCP in p and p[TCP].flags & 0x02 and not p[TCP].flags & 0x10:
            out.append((p[IP].src, p[IP].dst, p[TCP].dport))
    return out


def summaries(packets, limit: int = 12) -> str:
    lines = [p.summary() for p in packets[:limit]]
    if len(packets) > limit:
        lines.append(f"... {len(packets) - limit} more")
    return "\n".join(lines) or "(no packets)"


def pod_veth(c: Cluster, pod) -> str:
    return naming.host_veth("veth", pod.container_id, naming.POD_IFNAME)


def ns_inode(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


# -- the steps ------------------------------------------------------------------------------------
def step1_pod(lab: Lab, c: Cluster) -> None:
    lab.step("1. A one-pod ReplicationController: the pod, its interfaces, its pause container")
    pod = c.pods["frontend-0"]
    node = c.nodes[pod.node_name]
    lab.say(f"ReplicationController frontend (replicas 1): pod frontend-0 runs on {node.name} "
            f"({node.ip}) with IP {pod.ip} from the node's subnet {node.spec.pod_cidr}")
    lab.say(f"$ ip addr   (inside frontend-0)\n{pod.run(['ip', '-4', '-o', 'addr']).stdout.strip()}", block=True)
    lab.say(f"$ ip route  (inside frontend-0)\n{pod.run(['ip', 'route']).stdout.strip()}", block=True)
    app = pod.containers["php-redis"]
    holder, app_ns = ns_inode(pod.pid), ns_inode(app.pid)
    lab.say(f"infra (pause) holder: PID {pod.pid}, /proc/{pod.pid}/ns/net -> {holder}\n"
            f"app container php-redis: PID {app.pid}, /proc/{app.pid}/ns/net -> {app_ns}", block=True)
    lab.check("-", "1", "pause holder and app container share one network namespace", holder, app_ns,
              holder == app_ns)


def step2_no_nat(lab: Lab, c: Cluster, tmp: Path) -> None:
    lab.step("2. Node to pod and pod to pod: no NAT, no port mapping")
    from k8snetlab import conformance
    front, client = c.pods["frontend-0"], c.pods["client"]
    other = next(n for n in c.nodes.values() if n.name not in (front.node_name,))
    srv = front.popen_ns([sys.executable, conformance.PROBE, "serve", front.name, str(PROBE_PORT)],
                         what="walkthrough probe")
    try:
        proc.wait_listening(srv.pid, PROBE_PORT, 5, "walkthrough probe", child=srv)
        wire_host = c.nodes[front.node_name]
        cap = Capture(wire_host, "eth0", lab.pcaps / "step2-wire.pcap", f"tcp port {PROBE_PORT}")
        checker = conformance.ModelChecker(c)
        (a1,) = checker.ask(client, [f"{front.ip}:{PROBE_PORT}"])
        (a2,) = checker.ask(other, [f"{front.ip}:{PROBE_PORT}"])
        packets = cap.stop()
    finally:
        srv.terminate()
        srv.wait(5)
    lab.check("-", "2", f"pod client ({client.ip}, {client.node_name}) -> pod frontend-0 ({front.ip}): source the "
              "server sees", client.ip, a1.peer or a1.error, a1.ok and a1.peer == client.ip)
    lab.check("-", "2", f"node {other.name} -> pod frontend-0: source the server sees",
              f"an address of {other.name}", a2.peer or a2.error,
              a2.ok and a2.peer in checker.own_addresses(other))
    s = syns(packets)
    lab.say(f"capture on {front.node_name} eth0 (step2-wire.pcap):\n{summaries(packets)}", block=True)
    lab.check("-", "2", "on the wire the pod-to-pod SYN carries the pod addresses",
              f"{client.ip} > {front.ip}:{PROBE_PORT}", ", ".join(f"{a} > {b}:{p}" for a, b, p in s) or "none",
              (client.ip, front.ip, PROBE_PORT) in s)


def steps3to5(lab: Lab, c: Cluster, mode: str, requests: int, first: bool) -> None:
    svc_api = c.services
    lab.step(f"3. Service frontend, kube-proxy {mode}: the node's service rules")
    svc = svc_api.add_service(SERVICE)
    client = c.pods["client"]
    node = c.nodes[client.node_name]
    lab.say(f"Service frontend: clusterIP {svc.cluster_ip} (from {c.spec.network.service_cidr}), port 80")
    nat = node.run(["iptables-save", "-t", "nat"]).stdout
    wanted = ("KUBE-PORTALS", "KUBE-NODEPORT") if mode == "userspace" else ("KUBE-SERVICES", "KUBE-SVC", "KUBE-SEP")
    rules = [l for l in nat.splitlines() if l.startswith("-A") and any(w in l for w in wanted)
             and (svc.cluster_ip in l or f'"{svc.key}' in l)]
    lab.say(f"$ iptables-save -t nat   (on {node.name}, the service's rules)\n" + "\n".join(rules), block=True)
    if mode == "userspace":
        ok = any("REDIRECT" in l for l in rules) and any("DNAT" in l for l in rules)
        lab.check(mode, "3", "REDIRECT (PREROUTING) and DNAT (OUTPUT) send the service IP to the proxy's port",
                  "both rules", f"{len(rules)} rules", ok)
    else:
        ok = any("--probability" in l or "DNAT" in l for l in rules)
        lab.check(mode, "3", "KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP DNAT to the pods", "the chains", f"{len(rules)} rules", ok)

    lab.step(f"4. Scale frontend to 3 and send {requests} requests from pod client ({mode})")
    pods = c.scale("frontend", 3)
    lab.say("frontend pods: " + ", ".join(f"{p.name} {p.ip} on {p.node_name}" for p in pods))
    svc_api.resync()
    tag = mode   # -U --immediate-mode: every packet reaches the file at once (no 1 s TPACKET block)
    wire = Capture(node, "eth0", lab.pcaps / f"step4-{tag}-wire.pcap", "tcp port 80")
    veth = Capture(node, pod_veth(c, client), lab.pcaps / f"step4-{tag}-veth.pcap", "tcp port 80")
    try:
        out = client.run([sys.executable, "-c", GET_LOOP, svc.cluster_ip, str(requests)], timeout=60).stdout
    finally:
        w_packets, v_packets = wire.stop(), veth.stop()
    answers = out.split()
    lab.say(f"answers, in order: {' '.join(answers)}")
    lab.say(f"capture on the client pod's veth (step4-{tag}-veth.pcap):\n{summaries(v_packets)}", block=True)
    lab.say(f"capture on {node.name} eth0 (step4-{tag}-wire.pcap):\n{summaries(w_packets)}", block=True)

    lab.step(f"5. What the captures show ({mode})")
    by_ip = {p.ip: p for p in pods}
    v_syn, w_syn = syns(v_packets), syns(w_packets)
    inside = [s for s in v_syn if s[0] == client.ip and s[1] == svc.cluster_ip and s[2] == 80]
    lab.check(mode, "5", "inside: the pod connects to the service IP", f"{client.ip} > {svc.cluster_ip}:80",
              f"{len(inside)} SYNs of {len(v_syn)}", len(inside) >= requests)
    remote = [s for s in w_syn if s[1] in by_ip and by_ip[s[1]].node_name != node.name]
    src_expected = node.ip if mode == "userspace" else client.ip
    lab.check(mode, "5", "on the wire: a connection to a backend pod on another node, from "
              + ("the node's IP (the proxy's second connection)" if mode == "userspace" else "the client pod's IP (DNAT, no proxy)"),
              f"{src_expected} > <pod on another node>:80",
              ", ".join(sorted({f'{a} > {b}:{p}' for a, b, p in remote})) or "none",
              bool(remote) and all(a == src_expected for a, _, _ in remote))
    nodes_hit = {by_ip[ip].node_name for ip in by_ip if by_ip[ip].name in answers}
    lab.check(mode, "5", "successive requests land on pods on different nodes", ">= 2 nodes",
              f"{len(set(answers))} pods on {len(nodes_hit)} nodes ({', '.join(sorted(nodes_hit))})",
              len(answers) == requests and len(nodes_hit) >= 2)
    conns = "two connections (pod -> service IP, node -> pod)" if mode == "userspace" else \
        "one connection (pod -> pod after DNAT)"
    lab.say(f"In {mode} mode: {conns}.")


def run(args) -> int:
    if args.quick:
        args.requests = min(args.requests, 12)
    base = experiment_script.load_topology(args)
    modes = [m for m in args.modes.split(",") if m]
    specs = [validate(dataclasses.replace(base, kube_proxy={**base.kube_proxy, "mode": m})) for m in modes]
    proc.require_root(NAME)
    proc.require("tcpdump")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = results.new_run_id()
    lab = Lab(out, run_id, args.step)
    for i, (mode, s) in enumerate(zip(modes, specs)):
        t0 = time.monotonic()
        with Cluster(s) as c:
            if getattr(c, "services", None) is None:
                raise K8sNetLabError("the Services add-on did not start: kubeProxy is needed for this lab")
            lab.say(f"cluster {c.spec.name} up in {time.monotonic() - t0:.1f} s, kube-proxy {mode}")
            if i == 0:
                step1_pod(lab, c)
                step2_no_nat(lab, c, out)
            else:
                lab.step(f"6. The same with kube-proxy {mode}")
            steps3to5(lab, c, mode, args.requests, i == 0)
    csv_path, md_path = lab.write()
    print(f"\nCSV: {csv_path}\nreport: {md_path}\ncaptures: {lab.pcaps}/")
    if lab.failed:
        print(f"{len(lab.failed)} check(s) failed: " + "; ".join(lab.failed), file=sys.stderr)
        return 1
    print("every check held")
    return 0


if __name__ == "__main__":
    sys.exit(experiment_script.main(run, build_parser()))
