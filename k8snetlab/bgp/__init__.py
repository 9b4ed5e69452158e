"""BGP for the ``bgp`` CNI mode (Calico's BGP networking): plans, speakers, route installer, status.

- :mod:`.plan`       who peers with whom (mesh, route reflectors, top-of-rack routers): plain data
- :mod:`.render`     BIRD and ExaBGP configuration from the plan (``templates/*.j2``): pure
- :mod:`.speakers`   the daemons: start/stop by PID, reload, status through their control channel
- :mod:`.installer`  ExaBGP's API process: learned routes -> the node's FIB (netlink)
- :mod:`.status`     sessions and routes parsed from the speakers' own output; tables

:func:`status_report` is ``k8snetlab bgp status``: it finds running clusters under the state
root and asks every speaker they run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..registry import Registry

# speaker name -> its driver (a speakers.Speaker subclass)
SPEAKERS: Registry[type] = Registry("BGP speaker", "k8snetlab.bgp_speakers")


def running_clusters(root: Path | None = None) -> list[tuple[str, str, Path]]:
    """(state dir name, cluster name, path) of every cluster whose runtime is alive."""
    from .. import naming, proc
    root = root or Path(os.environ.get("K8SNETLAB_STATE", naming.STATE_ROOT))
    out = []
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not path.is_dir() or naming.cluster_index_of(path.name) is None:
            continue
        try:
            owner = json.loads((path / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if proc.running(owner.get("pid", 0), owner.get("start", 0)):
            out.append((path.name, str(owner.get("name", "?")), path))
    return out


def status_report(cluster: str | None = None, root: Path | None = None) -> str:
    """Sessions and routes of every speaker of the running clusters (or of ``cluster``, a
    cluster name or state dir name such as ``knl3``), asked of each speaker."""
    from ..errors import K8sNetLabError, SpecError
    from . import status
    from .speakers import query
    clusters = running_clusters(root)
    if cluster is not None:
        chosen = [c for c in clusters if cluster in (c[0], c[1])]
        if not chosen:
            known = ", ".join(f"{name} ({d})" for d, name, _ in clusters) or "none is running"
            raise SpecError(f"--cluster {cluster}: no running cluster of that name: {known}")
        clusters = chosen
    blocks = []
    for d, name, path in clusters:
        descs = list(status.descriptors(path))
        if descs:
            blocks.append(f"cluster {name} ({d}):\n\n" + status.table([query(x) for x in descs]))
    if not blocks:
        raise K8sNetLabError("no running cluster has BGP speakers: start one with "
                             "'k8snetlab up topologies/three_nodes.yaml --cni bgp'")
    return "\n\n".join(blocks)
