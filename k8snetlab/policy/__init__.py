"""Namespaces and NetworkPolicy, enforced as Calico's felix does (iptables + ipsets) or with nftables.

- :mod:`.model`      the API objects, their validation and semantics (who may reach whom): pure
- :mod:`.plan`       one node's endpoints, policy chains and sets, dataplane-neutral: pure
- :mod:`.iptables`, :mod:`.nftables`   the dataplanes (rendering pure; one transaction a sync)
- :mod:`.addon`      the add-on: ``c.policies``, a policy agent per node, resync
- :mod:`.matrix`     ``k8snetlab policy matrix`` / ``explain``: probed vs expected

:func:`cluster_state` finds the state a running cluster's add-on wrote, for the CLI.
"""

from __future__ import annotations

import json
from typing import Any


def cluster_state(cluster: str | None = None) -> dict[str, Any]:
    """``policy.json`` of a running cluster (the only one, or ``cluster``: name or knlN)."""
    from ..bgp import running_clusters
    from ..errors import K8sNetLabError, SpecError
    from .addon import STATE_FILE
    found = [(d, name, path) for d, name, path in running_clusters() if (path / STATE_FILE).is_file()]
    if cluster is not None:
        found = [c for c in found if cluster in (c[0], c[1])]
        if not found:
            raise SpecError(f"--cluster {cluster}: no running cluster of that name")
    if not found:
        raise K8sNetLabError("no running cluster: start one with 'k8snetlab up FILE'")
    if len(found) > 1:
        raise SpecError("several clusters are running: pick one with --cluster "
                        + ", ".join(f"{name} ({d})" for d, name, _ in found))
    return json.loads((found[0][2] / STATE_FILE).read_text())
