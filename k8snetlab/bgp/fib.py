"""Reading nodes' kernel FIBs cheaply, to see BGP converge.

``/proc/PID/net/route`` shows the IPv4 main table of the network namespace ``PID`` lives in,
so the routes of a hundred nodes can be read a few times a second from the runtime's own
namespace, without entering any namespace or parsing netlink messages: what a convergence
measurement needs (the question is only "which prefixes are there").
"""

from __future__ import annotations

import ipaddress
import socket
import struct


def prefixes(pid: int) -> set[str]:
    """The destination prefixes (``10.244.1.0/24``) in the main table of ``pid``'s namespace;
    blackhole routes included (the kernel lists them with the reject flag)."""
    out = set()
    try:
        with open(f"/proc/{pid}/net/route") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < 8:
                    continue
                plen = bin(int(ipaddress.IPv4Address(_addr(fields[7])))).count("1")
                out.add(f"{_addr(fields[1])}/{plen}")
    except OSError:
        return set()
    return out


def _addr(hexval: str) -> str:
    """/proc/net/route prints addresses as host-order (little-endian) hex."""
    return socket.inet_ntoa(struct.pack("<I", int(hexval, 16)))
