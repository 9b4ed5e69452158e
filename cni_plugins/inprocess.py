"""Calling our own plugins inside the runtime's process instead of exec'ing them.

The plugin gets the same environment and stdin bytes and answers with the same stdout bytes
as under exec; only fork/exec and the interpreter's start are skipped. Plugins that are not
ours (the reference binaries) are still exec'd.
"""

from __future__ import annotations

from cni_plugins import PLUGINS, skel
from k8snetlab import proc
from k8snetlab.cni_protocol import ExecInvoker, decode_output


class InProcessInvoker:
    """Run our plugins' skeleton in this process, in the node's namespace; exec anything else."""

    def __init__(self) -> None:
        self._exec = ExecInvoker()

    def invoke(self, plugin_type: str, env: dict[str, str], stdin: bytes, node_netns: str | None,
               bin_dirs: tuple[str, ...]) -> bytes:
        if plugin_type not in PLUGINS:
            return self._exec.invoke(plugin_type, env, stdin, node_netns, bin_dirs)
        module = PLUGINS.get(plugin_type)
        with proc.netns(node_netns):
            rc, out = skel.dispatch(module, env, stdin, invoker=self)
        return decode_output(plugin_type, rc, out)
