"""Speaker configuration files from a :class:`~k8snetlab.bgp.plan.SpeakerPlan`: pure functions.

The templates live beside this module (``templates/*.j2``); rendering needs neither root nor
the daemons, so the unit tests read the exact text BIRD and ExaBGP are given. The drivers
write the text, have the daemon dry-run it (``bird -p``, ``exabgp validate``), then start.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .plan import Peer, SpeakerPlan

TEMPLATES = Path(__file__).resolve().parent / "templates"
RTPROT_BIRD = 12      # what BIRD's kernel protocol marks its routes with ("proto bird")
RTPROT_BGP = 186      # what our ExaBGP route installer marks its routes with ("proto bgp")


def protocol_name(peer: Peer) -> str:
    """A BIRD protocol name for a session, Calico-style: ``Mesh_192_168_1_130`` for mesh
    peers, ``Node_...`` for sessions to or from a reflector, ``ToR_...`` / ``Fabric_...``
    for the underlay routers. The peer's node name goes in the protocol's description."""
    prefix = {"mesh": "Mesh", "route-reflector": "Node", "tor": "ToR", "fabric": "Fabric"}[peer.kind]
    return f"{prefix}_{peer.address.replace('.', '_')}"


@functools.cache
def _env():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["protocol_name"] = protocol_name
    return env


def bird_conf(s: SpeakerPlan, log: str) -> str:
    """BIRD 2 configuration of one speaker; ``log`` is the log file's path."""
    return _env().get_template("bird.conf.j2").render(s=s, log=log, kernel_proto=RTPROT_BIRD)


def exabgp_conf(s: SpeakerPlan, installer: str) -> str:
    """ExaBGP configuration of one speaker; ``installer`` is the API process's command line."""
    return _env().get_template("exabgp.conf.j2").render(s=s, installer=installer, kernel_proto=RTPROT_BGP)
