"""Packaging: ``pip install .`` (or ``sudo make deps``, which installs the checkout editable).

Packages are found, not listed: a new package under k8snetlab/, cni_plugins/ or controllers/
is installed without touching this file. Non-Python files the code reads at run time (BPF C
source, speaker config templates) are package data.
"""

import os
import runpy

from setuptools import find_packages, setup

# our built-in choices of every axis, declared as entry points (the registry reads the same table)
ENTRY_POINTS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "k8snetlab",
                                            "extensions.py"))["ENTRY_POINTS"]

setup(
    name="k8snetlab",
    version="0.1.0",
    description="An emulated Kubernetes cluster network on one Linux machine (Mininet + CNI plugins)",
    packages=find_packages(include=["k8snetlab", "k8snetlab.*", "cni_plugins", "cni_plugins.*",
                                    "controllers", "controllers.*"]),
    package_data={"k8snetlab": ["bpf/*.c", "cni_shim.c", "pause.c"], "k8snetlab.bgp": ["templates/*.j2"]},
    python_requires=">=3.10",
    install_requires=["pyroute2>=0.9", "PyYAML>=6", "mininet>=2.3.0.dev6", "scapy>=2.5", "jinja2>=3",
                      "psutil>=5.9"],
    extras_require={"plot": ["matplotlib>=3.5"], "test": ["pytest>=7", "pytest-timeout>=2"]},
    entry_points={"console_scripts": ["k8snetlab = k8snetlab.cli:main"], **ENTRY_POINTS},
)
