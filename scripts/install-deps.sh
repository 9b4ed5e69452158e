#!/bin/sh
# Install what k8snetlab needs and is missing; idempotent (a second run installs nothing).
#   sh scripts/install-deps.sh [PYTHON]
# Debian packages: apt-get (one 'apt-get update' only when something is missing).
# Python packages: pip for the interpreter that will run the testbed.
set -eu

PYTHON=${1:-python3}
cd "$(dirname "$0")/.."

# program/library -> Debian package, for everything the code runs
DEBIAN_PACKAGES="
mininet
bridge-utils
net-tools
iproute2
iputils-ping
iperf3
tcpdump
procps
util-linux
ethtool
clang
llvm
libbpf-dev
bpftool
iptables
nftables
containernetworking-plugins
bird2
dnsmasq-base
conntrack
dnsutils
openvswitch-switch
sockperf
linux-perf
gcc
libc6-dev
golang-go
golang-github-appc-cni-dev
prometheus
ipset
"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: needs root to install packages: run 'sudo make deps'" >&2
    exit 2
fi

missing=""
for pkg in $DEBIAN_PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
# 'sudo python ...' (the README's command) needs a 'python' on root's PATH
if ! command -v python >/dev/null 2>&1 && [ "$PYTHON" = python3 ]; then
    missing="$missing python-is-python3"
fi
if [ -n "$missing" ]; then
    echo "install-deps: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "install-deps: all Debian packages present"
fi

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "install-deps: installing python3-pip"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi

# requirements.txt: one 'distribution[==version]' per line; check by distribution name
py_missing=$("$PYTHON" - <<'PY'
import importlib.metadata as md, re
need = []
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = re.split(r"[<>=!~\[ ]", line, 1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        need.append(line)
print(" ".join(need))
PY
)
if [ -n "$py_missing" ]; then
    echo "install-deps: installing Python packages: $py_missing"
    extra=""
    # Debian's own interpreter is "externally managed" (PEP 668)
    if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'; then
        extra="--break-system-packages"
    fi
    "$PYTHON" -m pip install -q $extra $py_missing
else
    echo "install-deps: all Python packages present"
fi

# the project itself, editable, and the 'k8snetlab' command on root's (sudo's) PATH
sh scripts/install-self.sh "$PYTHON"
