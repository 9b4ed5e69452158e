#!/bin/sh
# Install this checkout itself, editable (the checkout stays the code that runs), and put the
# 'k8snetlab' command on root's PATH, so 'sudo k8snetlab up ...' works as typed. Idempotent:
# a second run changes nothing.
#   sh scripts/install-self.sh [PYTHON] [BINDIR]      (BINDIR default /usr/local/bin)
# sudo resets PATH to its secure_path (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:...);
# an interpreter elsewhere (pyenv, a venv) puts its scripts where sudo does not look, so the
# command is linked into BINDIR. Only a symlink (ours or absent) there is ever replaced.
set -eu

PYTHON=${1:-python3}
BINDIR=${2:-/usr/local/bin}
cd "$(dirname "$0")/.."
HERE=$(pwd -P)

# installed editable from this very checkout already? (asked from /: the checkout's own
# k8snetlab.egg-info must not answer)
if (cd / && "$PYTHON" - "$HERE") <<'PY'
import os, sys, importlib.metadata as md
try:
    md.distribution("k8snetlab")
    import k8snetlab
except (md.PackageNotFoundError, ImportError):
    sys.exit(1)
sys.exit(0 if os.path.realpath(k8snetlab.__file__) == os.path.join(sys.argv[1], "k8snetlab", "__init__.py") else 1)
PY
then
    echo "install-self: k8snetlab already installed editable from $HERE"
else
    echo "install-self: installing k8snetlab editable from $HERE"
    extra=""
    # Debian's own interpreter is "externally managed" (PEP 668)
    if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'; then
        extra="--break-system-packages"
    fi
    # the dependencies come from requirements.txt (install-deps.sh); no build isolation: no download
    "$PYTHON" -m pip install -q $extra --no-deps --no-build-isolation -e .
fi

SCRIPTS=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ ! -x "$SCRIPTS/k8snetlab" ]; then
    echo "install-self: pip put no 'k8snetlab' script in $SCRIPTS" >&2
    exit 1
fi
target="$SCRIPTS/k8snetlab"
link="$BINDIR/k8snetlab"
if [ "$(cd "$SCRIPTS" && pwd -P)" = "$(mkdir -p "$BINDIR" && cd "$BINDIR" && pwd -P)" ]; then
    echo "install-self: 'k8snetlab' is in $BINDIR"
elif [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
    echo "install-self: $link -> $target already"
elif [ -e "$link" ] && [ ! -L "$link" ]; then
    echo "install-self: $link exists and is not a link made here; left alone (remove it to use $target)" >&2
else
    ln -sfn "$target" "$link"
    echo "install-self: linked $link -> $target (on sudo's PATH)"
fi
