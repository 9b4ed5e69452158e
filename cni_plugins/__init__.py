"""Our CNI plugins: one module per CNI ``type``, each also a CNI executable.

The registry maps a CNI ``type`` (the binary name a network config names) to its module.
Adding a plugin is one module exposing ``add(conf, args) -> Result``, ``delete(conf, args)``,
``check(conf, args)`` (optionally ``status`` and ``gc``) plus one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "bridge": "cni_plugins.bridge",
    "flannel": "cni_plugins.flannel",
    "calico": "cni_plugins.calico",
    "host-local": "cni_plugins.host_local",
}


class _Plugins:
    def __contains__(self, plugin_type: str) -> bool:
        return plugin_type in _MODULES

    def get(self, plugin_type: str) -> ModuleType:
        return importlib.import_module(_MODULES[plugin_type])

    def names(self) -> list[str]:
        return sorted(_MODULES)


PLUGINS = _Plugins()
