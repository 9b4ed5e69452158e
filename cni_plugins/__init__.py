"""Our CNI plugins: one module per CNI ``type``, each also a CNI executable.

A plugin module exposes ``add(conf, args) -> Result``, ``delete(conf, args)``,
``check(conf, args)`` (optionally ``status`` and ``gc``). :data:`PLUGINS` maps a CNI ``type``
to its module; it reads the ``k8snetlab.cni_plugins`` entry-point group.
"""

from __future__ import annotations

from types import ModuleType

from k8snetlab.registry import Registry

PLUGINS: Registry[ModuleType] = Registry("CNI plugin", "k8snetlab.cni_plugins")
