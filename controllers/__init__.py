"""OpenFlow controller apps for an Open vSwitch underlay (``underlay: {switch: ovs, controller: APP}``).

The apps are written against the Ryu application API. Ryu itself no longer installs on current
Python; os-ken, OpenStack's maintained fork, has the same API under the package ``os_ken``.
This package holds their registry and the helpers they share (:class:`AppInfo`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k8snetlab.errors import SpecError
from k8snetlab.registry import Registry

OPENFLOW_PORT = 6653                      # IANA's OpenFlow port; each cluster has its own loopback
STATE_ENV = "K8SNETLAB_CONTROLLER_STATE"  # where an app may export its view (JSON), see export_state
FRAMEWORKS = ("os_ken", "ryu")            # tried in this order


@dataclass(frozen=True)
class AppInfo:
    """One controller app of the registry.

    ``loops``: safe on an underlay whose switches form loops (no flooding across links);
    the cluster file is refused otherwise. ``observe_links``: the app needs the framework's
    topology service with LLDP link discovery (``--observe-links``). ``exports``: the app
    writes its view of the network to the file named by ``$K8SNETLAB_CONTROLLER_STATE``.

    - ``APPS``, the registry: app name -> :class:`AppInfo` (module, what it can do). Adding an app
      is one module plus an ``AppInfo`` declared in the ``k8snetlab.controller_apps`` entry-point
      group. An ``AppInfo`` imports no framework, so ``k8snetlab controllers`` and cluster-file
      validation work without os-ken installed.
    - the import shim: an app writes ``from controllers import App, set_ev_cls, MAIN_DISPATCHER``
      and gets the names from ``os_ken`` (or from ``ryu`` where that is what is installed); see
      ``_SHIM`` for every name. Names are resolved on first use (PEP 562 ``__getattr__``).
    - small helpers the apps share (:func:`add_flow`, :func:`delete_flows`, :func:`packet_out`,
      :func:`export_state`): they only use the datapath object they are given, so they work with
      both frameworks.

    The runtime starts the apps with ``python -m controllers`` (see ``controllers/__main__.py``) in
    the Open vSwitch namespace, listening on its loopback, and stops that process by PID.
    """
    name: str
    module: str
    loops: bool = False
    observe_links: bool = False
    exports: bool = False

    @property
    def path(self) -> Path | None:
        """The app's source file, found without importing it."""
        try:
            found = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        return Path(found.origin) if found is not None and found.origin else None

    @property
    def description(self) -> str:
        """The first line of the module's docstring, read without importing it."""
        try:
            doc = ast.get_docstring(ast.parse(self.path.read_text())) if self.path else None
        except (OSError, SyntaxError):
            doc = None
        return (doc or "(no description)").strip().splitlines()[0]


L2_LEARNING = AppInfo("l2_learning", "controllers.l2_learning", exports=True)
FABRIC = AppInfo("fabric", "controllers.fabric", loops=True, observe_links=True, exports=True)
SERVICE_LB = AppInfo("service_lb", "controllers.service_lb", exports=True)

# app name -> AppInfo, from the ``k8snetlab.controller_apps`` entry-point group
APPS: Registry[AppInfo] = Registry("controller app", "k8snetlab.controller_apps")


class AppError(Exception):
    """An app name that is not in the registry, or an app module that cannot be imported."""


def get(name: str) -> AppInfo:
    try:
        return APPS.get(name)
    except SpecError as e:
        raise AppError(f"{e} (or none)") from None


_import_errors: dict[str, str | None] = {}


def import_error(name: str) -> str | None:
    """Why the app's module cannot be imported (one line, with the fix), or None if it can.

    Imports it in this process (os-ken's default hub is native threads: importing patches
    nothing); the answer is cached per app.
    """
    app = get(name)
    if name not in _import_errors:
        try:
            importlib.import_module(app.module)
            _import_errors[name] = None
        except ImportError as e:
            missing = getattr(e, "name", None) or ""
            if missing.split(".")[0] in FRAMEWORKS or "os_ken" in str(e):
                _import_errors[name] = f"{e}: pip install os-ken (or run 'sudo make deps')"
            else:
                _import_errors[name] = f"{type(e).__name__}: {e}"
        except Exception as e:   # a bug in the app: say what and where
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _import_errors[name]


# ------------------------------------------------------------------------------- import shim
# name an app imports -> (module below the framework package, attribute or None for the module)
_SHIM: dict[str, tuple[str, str | None]] = {
    "app_manager": ("base.app_manager", None),
    "ofp_event": ("controller.ofp_event", None),
    "set_ev_cls": ("controller.handler", "set_ev_cls"),
    "CONFIG_DISPATCHER": ("controller.handler", "CONFIG_DISPATCHER"),
    "MAIN_DISPATCHER": ("controller.handler", "MAIN_DISPATCHER"),
    "DEAD_DISPATCHER": ("controller.handler", "DEAD_DISPATCHER"),
    "ofproto_v1_3": ("ofproto.ofproto_v1_3", None),
    "packet": ("lib.packet.packet", None),
    "ethernet": ("lib.packet.ethernet", None),
    "ether_types": ("lib.packet.ether_types", None),
    "arp": ("lib.packet.arp", None),
    "ipv4": ("lib.packet.ipv4", None),
    "tcp": ("lib.packet.tcp", None),
    "udp": ("lib.packet.udp", None),
    "topology_event": ("topology.event", None),
    "hub": ("lib.hub", None),
}


def framework() -> str:
    """``os_ken`` or ``ryu``: the first one installed. Raises ImportError naming the fix."""
    for fw in FRAMEWORKS:
        try:
            importlib.import_module(f"{fw}.base.app_manager")
            return fw
        except ImportError:
            continue
    raise ImportError("No module named 'os_ken' (nor 'ryu'): pip install os-ken", name="os_ken")


def __getattr__(name: str) -> Any:
    if name == "App":   # the app base class: OSKenApp in os-ken, RyuApp in Ryu
        mgr = importlib.import_module(f"{framework()}.base.app_manager")
        value = getattr(mgr, "OSKenApp", None) or getattr(mgr, "RyuApp")
    elif name in _SHIM:
        sub, attr = _SHIM[name]
        mod = importlib.import_module(f"{framework()}.{sub}")
        value = getattr(mod, attr) if attr else mod
    else:
        raise AttributeError(f"module 'controllers' has no attribute {name!r}")
    globals()[name] = value
    return value


# ------------------------------------------------------------------------------- helpers
def add_flow(dp: Any, priority: int, match: Any, actions: list[Any] | None = None, *,
             table: int = 0, goto: int | None = None, idle: int = 0, hard: int = 0,
             cookie: int = 0, command: int | None = None, flags: int = 0) -> None:
    """Install (or replace: same table, match and priority) one OpenFlow 1.3 flow.
    ``flags``: e.g. ``ofproto.OFPFF_SEND_FLOW_REM`` to hear when it expires."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    inst = []
    if actions:
        inst.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
    if goto is not None:
        inst.append(parser.OFPInstructionGotoTable(goto))
    dp.send_msg(parser.OFPFlowMod(datapath=dp, table_id=table, priority=priority, match=match,
                                  instructions=inst, idle_timeout=idle, hard_timeout=hard,
                                  cookie=cookie, flags=flags,
                                  command=ofp.OFPFC_ADD if command is None else command))


def delete_flows(dp: Any, match: Any, *, table: int | None = None, cookie: int = 0,
                 priority: int | None = None) -> None:
    """Delete the flows of ``cookie`` that match (strictly, when ``priority`` is given)."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    dp.send_msg(parser.OFPFlowMod(
        datapath=dp, table_id=ofp.OFPTT_ALL if table is None else table,
        command=ofp.OFPFC_DELETE if priority is None else ofp.OFPFC_DELETE_STRICT,
        priority=priority or 0, match=match, cookie=cookie, cookie_mask=0xFFFFFFFFFFFFFFFF if cookie else 0,
        out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))


def packet_out(dp: Any, in_port: int, actions: list[Any], data: bytes) -> None:
    """Send ``data`` (a whole frame: our table-miss flows never buffer) with ``actions``."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    dp.send_msg(parser.OFPPacketOut(datapath=dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port,
                                    actions=actions, data=data))


def table_miss_to_controller(dp: Any, table: int = 0) -> None:
    """The lowest-priority flow: whatever no other flow matches goes to the controller, whole."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    add_flow(dp, 0, parser.OFPMatch(), [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)],
             table=table)


def export_state(data: dict[str, Any]) -> None:
    """Write the app's view (switches, links, hosts...) as JSON to ``$K8SNETLAB_CONTROLLER_STATE``.

    The runtime reads it to wait until the app has discovered the underlay and to show it;
    written atomically (a reader never sees half a file). No-op when the variable is unset.
    """
    path = os.environ.get(STATE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**data, "time": time.time()}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """What an app exported ({} when nothing yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
