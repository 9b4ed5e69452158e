"""Netns looks interfaces up by one ioctl in its namespace (no privileges needed to read): the
same index the kernel gives by name, None for a name that is not there or cannot be one."""

from __future__ import annotations

import socket

from k8snetlab.netutil import Netns


def test_index_is_the_kernels_and_none_for_what_is_not_there():
    with Netns(None, "here") as ns:
        assert ns.index("lo") == socket.if_nametoindex("lo") == ns.require_index("lo")
        assert ns.index("knl-not-there") is None
        assert ns.index("x" * 16) is None and ns.index("") is None
        assert ns.require_index(7) == 7


def test_link_brief_says_what_a_full_link_request_says():
    with Netns(None, "here") as ns:
        full, brief = ns.link("lo"), ns.link_brief("lo")
        assert {k: brief[k] for k in ("index", "mtu", "mac", "up")} == \
            {k: full[k] for k in ("index", "mtu", "mac", "up")}
        assert ns.link_brief("knl-not-there") is None
