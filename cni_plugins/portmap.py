"""CNI ``portmap``: hostPort as the reference plugin builds it, iptables nat on the node.

A chained plugin: it makes no interface; it forwards ``hostIP:hostPort`` of the node to the pod
address of ``prevResult``, from the ``portMappings`` capability argument
(``runtimeConfig.portMappings``). The nat layout is at :func:`shared_chains` and :func:`dnat_rules`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shlex
import sys
import threading
from typing import Any

from cni_plugins import skel
from cni_plugins.common import field, host_ns
from k8snetlab import cni_protocol as cni, proc
from k8snetlab.cni_protocol import CNIError, Result
from k8snetlab.errors import CommandError

TOP_DNAT = "CNI-HOSTPORT-DNAT"
SETMARK = "CNI-HOSTPORT-SETMARK"
MASQ = "CNI-HOSTPORT-MASQ"
MAX_CHAIN = 28            # iptables' limit on a chain name
MULTIPORT_MAX = 15        # ports one multiport match takes
PROTOCOLS = ("tcp", "udp", "sctp")

_setup_lock = threading.Lock()   # the shared chains, between ADDs served in one process


# -- config -----------------------------------------------------------------------------------
def parse(conf: dict[str, Any]) -> dict[str, Any]:
    """The plugin's own fields and the port mappings, checked (CNIError 7 naming the field)."""
    snat = field(conf, "snat", bool, True)
    bit = field(conf, "markMasqBit", int, None)
    external = field(conf, "externalSetMarkChain", str, None)
    if bit is not None and external is not None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "markMasqBit and externalSetMarkChain cannot both be set")
    bit = 13 if bit is None else bit
    if not 0 <= bit <= 31:
        raise CNIError(cni.ERR_INVALID_CONFIG, f"markMasqBit {bit} is not a bit number 0-31")
    cond = field(conf, "conditionsV4", list, []) or []
    rc = conf.get("runtimeConfig") or {}
    maps = rc.get("portMappings") or []
    if not isinstance(maps, list):
        raise CNIError(cni.ERR_INVALID_CONFIG, "runtimeConfig.portMappings must be a list")
    out = []
    for m in maps:
        try:
            hp, cp = int(m["hostPort"]), int(m["containerPort"])
            proto = str(m.get("protocol") or "tcp").lower()
            host_ip = str(m.get("hostIP") or "")
        except (KeyError, TypeError, ValueError):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"port mapping {m!r} needs hostPort and containerPort") from None
        if not (0 < hp < 65536 and 0 < cp < 65536) or proto not in PROTOCOLS:
            raise CNIError(cni.ERR_INVALID_CONFIG, f"invalid port mapping {m!r}")
        if host_ip:
            try:
                if ipaddress.ip_address(host_ip).version != 4:
                    continue             # an IPv6 hostIP is for an IPv6 pod address: none here
            except ValueError:
                raise CNIError(cni.ERR_INVALID_CONFIG, f"hostIP {host_ip!r} is not an IP address") from None
        out.append({"hostPort": hp, "containerPort": cp, "protocol": proto, "hostIP": host_ip})
    return {"snat": snat, "bit": bit, "setmark": external or SETMARK, "external": external is not None,
            "conditions": [str(c) for c in cond], "mappings": out}


def container_ip(prev: Result | None, ifname: str) -> tuple[str, str]:
    """The pod's IPv4 address and its network (``10.244.1.5``, ``10.244.1.0/24``) from
    prevResult: the sandbox interface's, else the first."""
    if prev is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "portmap must be chained after a plugin that returns the pod's IP",
                       "no prevResult")
    cidr = prev.sandbox_ip(ifname)
    if cidr is None:
        raise CNIError(cni.ERR_INVALID_CONFIG, "prevResult has no IP address for the pod")
    iface = ipaddress.ip_interface(cidr)
    return str(iface.ip), str(iface.network)


# -- rules (pure) -------------------------------------------------------------------------------
def dnat_chain_name(network: str, container_id: str) -> str:
    """``CNI-DN-`` + the SHA-512 of network name and container ID, cut to 28 characters."""
    return ("CNI-DN-" + hashlib.sha512((network + container_id).encode()).hexdigest())[:MAX_CHAIN]


def mark(bit: int) -> str:
    return f"{1 << bit:#x}/{1 << bit:#x}"


def shared_chains(c: dict[str, Any]) -> list[tuple[str, list[list[str]], list[tuple[str, list[str], bool]]]]:
    """The shared chains: (name, rules, [(entry chain, entry match, prepend)]).

    ``PREROUTING`` and ``OUTPUT`` jump to ``CNI-HOSTPORT-DNAT`` for every packet to an address of
    the node (``addrtype LOCAL``); ``CNI-HOSTPORT-SETMARK`` sets the masquerade mark bit (13:
    ``0x2000``) and ``CNI-HOSTPORT-MASQ``, first in ``POSTROUTING``, masquerades what carries
    it, so a pod reaching its own hostPort through the node sees the node's address and its
    reply comes back through the node's conntrack. They are made once and never deleted, as
    the reference does; DEL removes only the pod's jumps and its ``CNI-DN-`` chain."""
    chains = []
    if c["snat"] and not c["external"]:
        chains.append((SETMARK, [["-m", "comment", "--comment", "CNI portfwd masquerade mark",
                                  "-j", "MARK", "--set-xmark", mark(c["bit"])]], []))
        chains.append((MASQ, [["-m", "mark", "--mark", mark(c["bit"]), "-j", "MASQUERADE"]],
                       [("POSTROUTING", ["-m", "comment", "--comment", "CNI portfwd requiring masquerade"], True)]))
    chains.append((TOP_DNAT, [], [(entry, ["-m", "addrtype", "--dst-type", "LOCAL"], False)
                                  for entry in ("PREROUTING", "OUTPUT")]))
    return chains


def entry_rules(c: dict[str, Any], network: str, container_id: str) -> list[list[str]]:
    """The jumps from CNI-HOSTPORT-DNAT to the pod's chain: one per protocol and 15 ports."""
    chain = dnat_chain_name(network, container_id)
    comment = f'dnat name: "{network}" id: "{container_id}"'[:256]
    rules = []
    for proto in sorted({m["protocol"] for m in c["mappings"]}):
        ports = list(dict.fromkeys(str(m["hostPort"]) for m in c["mappings"] if m["protocol"] == proto))
        for i in range(0, len(ports), MULTIPORT_MAX):
            rules.append(["-m", "comment", "--comment", comment, "-m", "multiport", "-p", proto,
                          "--destination-ports", ",".join(ports[i:i + MULTIPORT_MAX]), *c["conditions"],
                          "-j", chain])
    return rules


def dnat_rules(c: dict[str, Any], ip: str, net: str) -> list[list[str]]:
    """The pod's ``CNI-DN-<hash>`` chain: per mapping, the hairpin marks (with snat) for the pod's network, as the
    reference marks it (pods of one bridge reaching each other's hostPort come back through
    the node too), and for localhost, then DNAT."""
    rules = []
    for m in c["mappings"]:
        base = ["-p", m["protocol"], "--dport", str(m["hostPort"])]
        if m["hostIP"]:
            base += ["-d", m["hostIP"]]
        if c["snat"]:
            rules.append([*base, "-s", net, "-j", c["setmark"]])
            rules.append([*base, "-s", "127.0.0.1", "-j", c["setmark"]])
        rules.append([*base, "-j", "DNAT", "--to-destination", f"{ip}:{m['containerPort']}"])
    return rules


def restore_input(chain: str, rules: list[list[str]], entries: list[list[str]]) -> str:
    """``iptables-restore --noflush`` input that (re)writes the pod's chain and its jumps in one
    transaction (declaring the pod's own chain flushes it, which is what a re-ADD wants)."""
    lines = ["*nat", f":{chain} - [0:0]"]
    lines += [" ".join(["-A", chain, *map(_quote, r)]) for r in rules]
    lines += [" ".join(["-A", TOP_DNAT, *map(_quote, r)]) for r in entries]
    return "\n".join([*lines, "COMMIT", ""])


def _quote(arg: str) -> str:
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"' if any(ch in arg for ch in ' "\'') else arg


# -- iptables (root) ----------------------------------------------------------------------------
def _ipt(*args: str, check: bool = True) -> Any:
    return proc.run(["iptables", "-w", "-t", "nat", *args], check=check)


def _exists(chain: str, rule: list[str]) -> bool:
    return _ipt("-C", chain, *rule, check=False).returncode == 0


def _chain_exists(chain: str) -> bool:
    return _ipt("-S", chain, check=False).returncode == 0


def _ensure_shared(c: dict[str, Any]) -> None:
    with _setup_lock:
        for name, rules, entries in shared_chains(c):
            if not _chain_exists(name):
                r = _ipt("-N", name, check=False)
                if r.returncode != 0 and not _chain_exists(name):   # another ADD won the race: fine
                    raise CNIError(cni.ERR_IO, f"cannot create iptables chain {name}", r.stderr.strip())
            for rule in rules:
                if not _exists(name, rule):
                    _ipt("-A", name, *rule)
            for entry, match, prepend in entries:
                rule = [*match, "-j", name]
                if not _exists(entry, rule):
                    _ipt("-I" if prepend else "-A", entry, *(["1"] if prepend else []), *rule)


def _teardown(chain: str) -> None:
    """Remove the jumps to ``chain`` from CNI-HOSTPORT-DNAT, then the chain; gone is fine."""
    listing = _ipt("-S", TOP_DNAT, check=False)
    if listing.returncode == 0:
        for line in listing.stdout.splitlines():
            words = line.split()
            if words[:2] == ["-A", TOP_DNAT] and words[-2:] == ["-j", chain]:
                # -S prints a rule as -D takes it (the comment shell-quoted)
                _ipt("-D", *shlex.split(line)[1:], check=False)
    if _chain_exists(chain):
        _ipt("-F", chain)
        _ipt("-X", chain)


def _route_localnet(ip: str) -> None:
    """route_localnet on the node interface that routes to the pod (127.0.0.1:hostPort)."""
    with host_ns() as host:
        name = host.route_dev(ip)
        if name:
            host.set_sysctl(f"net.ipv4.conf.{name}.route_localnet", 1)


def _forget_udp(c: dict[str, Any]) -> None:
    """Stale UDP conntrack entries to the host ports would bypass the new DNAT: drop them."""
    ports = {m["hostPort"] for m in c["mappings"] if m["protocol"] == "udp"}
    if ports:
        with host_ns() as host:
            for port in ports:
                host.delete_conntrack(17, orig_dport=port)


# -- CNI commands -------------------------------------------------------------------------------
def add(conf: dict[str, Any], args: skel.CmdArgs) -> Result:
    c = parse(conf)
    prev = args.prev_result
    if not c["mappings"]:
        if prev is None:
            raise CNIError(cni.ERR_INVALID_CONFIG, "portmap needs prevResult")
        return prev
    ip, net = container_ip(prev, args.ifname)
    chain = dnat_chain_name(conf["name"], args.container_id)
    try:
        _ensure_shared(c)
        if c["snat"]:
            _route_localnet(ip)
        _teardown(chain)                    # a collision or a half-made earlier ADD
        proc.run(["iptables-restore", "-w", "--noflush"],
                 input=restore_input(chain, dnat_rules(c, ip, net), entry_rules(c, conf["name"], args.container_id)))
        _forget_udp(c)
    except CommandError as e:
        _teardown(chain)
        raise CNIError(cni.ERR_IO, f"portmap: {e}") from None
    except Exception:
        _teardown(chain)
        raise
    assert prev is not None
    return prev


def delete(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    c = parse(conf)
    if not c["mappings"]:
        return
    try:
        _teardown(dnat_chain_name(conf["name"], args.container_id))
    except CommandError as e:
        raise CNIError(cni.ERR_IO, f"portmap: {e}") from None


def check(conf: dict[str, Any], args: skel.CmdArgs) -> None:
    """``iptables -C`` for every rule ADD made."""
    c = parse(conf)
    if not c["mappings"]:
        return
    ip, net = container_ip(args.prev_result, args.ifname)
    chain = dnat_chain_name(conf["name"], args.container_id)
    for name, rules, entries in shared_chains(c):
        for entry, match, _ in entries:
            if not _exists(entry, [*match, "-j", name]):
                raise CNIError(cni.ERR_INVALID_CONFIG, f"the jump from {entry} to {name} is missing")
        for rule in rules:
            if not _exists(name, rule):
                raise CNIError(cni.ERR_INVALID_CONFIG, f"a rule of {name} is missing: {' '.join(rule)}")
    for rule in entry_rules(c, conf["name"], args.container_id):
        if not _exists(TOP_DNAT, rule):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"the jump from {TOP_DNAT} to {chain} is missing")
    for rule in dnat_rules(c, ip, net):
        if not _exists(chain, rule):
            raise CNIError(cni.ERR_INVALID_CONFIG, f"a rule of {chain} is missing: {' '.join(rule)}")


if __name__ == "__main__":
    skel.main(sys.modules[__name__])
