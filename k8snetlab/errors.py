"""Exceptions of the testbed.

Library code raises these; only the CLI (and the experiments' ``main``) turns them into
one line on stderr and an exit status. Every message names the problem *and* the fix.
"""

from __future__ import annotations


MAX_MESSAGE = 1000      # characters: a message quotes what a user wrote, never all of it


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one line of at most ``limit`` characters (the middle cut, the cut said)."""
    text = " ".join(str(text).split("\n"))
    if len(text) <= limit:
        return text
    keep = limit - 40
    return f"{text[:keep - 100]} ...({len(text) - keep:,} characters cut)... {text[-100:]}"


class K8sNetLabError(Exception):
    """Base class: an error a user can act on. ``str(e)`` is the one line to print (newlines
    joined, capped at :data:`MAX_MESSAGE` characters)."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


class SpecError(K8sNetLabError):
    """A cluster file, manifest or option is invalid (names file, key and fix)."""


class ToolMissing(K8sNetLabError):
    """An external program is not installed."""

    def __init__(self, tool: str, package: str, kind: str = "Debian"):
        self.tool, self.package = tool, package
        how = f"apt-get install {package}" if kind == "Debian" else f"pip install {package}"
        super().__init__(f"'{tool}' is not installed: {how} (or run 'sudo make deps')")


class NotRoot(K8sNetLabError):
    def __init__(self, what: str = "building an emulated cluster"):
        super().__init__(f"{what} needs root (network namespaces): run it with sudo")


class KernelFeatureMissing(K8sNetLabError):
    """The running kernel lacks a feature and the chosen option needs it."""


class CommandError(K8sNetLabError):
    """An external command exited non-zero; carries what was run and what it said."""

    def __init__(self, args: list[str], returncode: int, stdout: str = "", stderr: str = "",
                 where: str = ""):
        self.args_run, self.returncode = list(args), returncode
        self.stdout, self.stderr = stdout, stderr
        place = f" in {where}" if where else ""
        detail = (stderr or stdout).strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        super().__init__(f"command failed{place} (exit {returncode}): {' '.join(args)}{tail}")


class NetlinkError(K8sNetLabError):
    """A datapath change failed; says which change, in which namespace."""
