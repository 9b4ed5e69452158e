"""Small C programs of ours (the CNI shim, the sandbox holder), compiled once per source.

A binary is cached as ``<cache_dir>/.<stem>-<hash of source and flags>``, linked statically
where the C library allows it (no dynamic loader at each exec: a few hundred microseconds of
CPU, paid once per pod or per CNI call), dynamically otherwise. No C compiler, or a broken
one, gives None: the caller falls back to what it did before (a Python shim, ``mnexec``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from . import proc
from .errors import CommandError

log = logging.getLogger(__name__)

FLAGS = ("-O2", "-Wall")
BUILD = b"static-first 1"       # bump to rebuild every cached binary


def compiled(source: Path, cache_dir: Path, stem: str) -> Path | None:
    """The binary of ``source``, built into ``cache_dir`` once; None without a C compiler."""
    text = source.read_bytes()
    key = hashlib.sha256(text + b"\0" + " ".join(FLAGS).encode() + b"\0" + BUILD).hexdigest()[:16]
    binary = cache_dir / f".{stem}-{key}"
    if binary.exists():
        return binary
    cc = next((c for c in ("cc", "gcc", "clang") if proc.which(c)), None)
    if cc is None:
        log.info("no C compiler: %s is not built", source.name)
        return None
    tmp = cache_dir / f".{binary.name}.{os.getpid()}.tmp"
    try:
        try:
            proc.run([cc, *FLAGS, "-static", "-o", str(tmp), str(source)], timeout=120)
        except CommandError:            # no static C library (libc6-dev without libc.a)
            proc.run([cc, *FLAGS, "-o", str(tmp), str(source)], timeout=120)
        tmp.replace(binary)
    except Exception as e:   # a broken toolchain is no reason to refuse a cluster
        log.warning("compiling %s failed (%s)", source.name, e)
        tmp.unlink(missing_ok=True)
        return None
    return binary
