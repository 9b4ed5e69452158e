#!/usr/bin/env python3
"""The Kubernetes network model, checked for every mode: Docker's default network vs the CNI modes.

For each mode the same cluster is started and ``k8snetlab check-model`` runs on it: (a) every
pod reaches every pod without NAT, (b) every node reaches every pod and back without NAT,
(c) a pod's own IP is the IP others see; and the four kinds of traffic (container to container
in one pod, pod to pod, pod to Service, external to Service). ``docker`` is the baseline
Kubernetes rejects: it must fail (a) and pass what it really passes; every CNI mode must pass
all three. Output: a table on stdout, a CSV with every check and its evidence, and a Markdown
report beside it.

    sudo python experiments/network_model.py [--modes docker,host-gw,ipip] [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from k8snetlab import experiment_script, conformance, proc, results, spec  # noqa: E402
from k8snetlab.errors import SpecError  # noqa: E402
from k8snetlab.validate import validate  # noqa: E402
from k8snetlab.modes import MODES  # noqa: E402

NAME = "network_model"
# bridge is left out by default: it wires the pods of each node and nothing between nodes
PREFERRED = ("docker", "host-gw", "vxlan", "ipip", "bgp")


def build_parser():
    p = experiment_script.parser(__doc__.strip().splitlines()[0], default_repeat=1)
    p.add_argument("--modes", help="comma-separated modes (default: docker and every CNI mode that "
                   "applies to the topology)")
    p.add_argument("--kube-proxy", default="iptables",
                   help="kube-proxy mode for the Service checks (default %(default)s; 'none' to skip)")
    return p


def applicable(base: spec.ClusterSpec, wanted: list[str] | None) -> tuple[list[str], list[str]]:
    """The modes to run, and why the others are skipped."""
    names = wanted or [m for m in PREFERRED if m in MODES.names()]
    run, skipped = [], []
    for m in names:
        try:
            spec.with_cni(base, m)
            run.append(m)
        except SpecError as e:
            if wanted:
                raise
            skipped.append(f"{m}: {e}")
    return run, skipped


def with_services(base: spec.ClusterSpec, kube_proxy: str) -> spec.ClusterSpec:
    """Turn the Services add-on on (if it is installed) so pod/external-to-Service are checked."""
    from k8snetlab import addons
    if kube_proxy == "none" or base.kube_proxy or "services" not in addons.ADDONS:
        return base
    return validate(dataclasses.replace(base, kube_proxy={"mode": kube_proxy}))


def run(args) -> int:
    base = experiment_script.load_topology(args)
    modes, skipped = applicable(base, [m for m in args.modes.split(",") if m] if args.modes else None)
    base = with_services(base, args.kube_proxy)
    proc.require_root(NAME)
    out_dir, run_id, csv_path = experiment_script.output(args, NAME)
    md_path = out_dir / f"{NAME}-{run_id}.md"
    started = results.utc_timestamp()
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)

    progress = experiment_script.Progress(len(modes))
    found = conformance.check_modes(base, modes, progress=lambda m: progress.step(m))
    keys = (*conformance.REQUIREMENTS, *conformance.TRAFFIC)
    headers = ["mode", *[f"({k})" if k in conformance.REQUIREMENTS else k for k in keys]]
    table = []
    for i, (mode, checks) in enumerate(found.items()):
        conformance.write_csv(csv_path, mode, checks, append=i > 0)
        summary = conformance.summarize(checks)
        table.append([mode, *[_cell(*summary[k]) for k in keys]])
    text = results.format_table(headers, table)
    print(text)
    expectations = _expectations(found)
    for line in expectations:
        print(line)
    lines = [f"# Kubernetes network model, run {run_id}", "",
             f"Topology `{base.source}`; Services through kube-proxy `{base.kube_proxy.get('mode', 'none')}`.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in table]
    lines += ["", "## What this shows", *[f"- {e}" for e in expectations], "", "## Failures, with evidence"]
    for mode, checks in found.items():
        bad = [c for c in checks if c.passed is False]
        lines.append(f"### {mode}: {len(bad)} failed check(s)")
        lines += [f"- [{c.check}] {c.source} -> {c.target}: {c.evidence}" for c in bad[:30]]
    if skipped:
        lines += ["", "## Skipped", *[f"- {s}" for s in skipped]]
    from k8snetlab import framework
    lines += ["", *framework.provenance(started, "One pass per mode: pass/fail checks with their evidence, "
                                                 "no rounds or intervals.")]
    md_path.write_text("\n".join(lines) + "\n")
    print(f"CSV: {csv_path}\nreport: {md_path}")
    return 0 if all(e.startswith("ok") for e in expectations) else 1


def _cell(passed: int, total: int, verdict: bool | None) -> str:
    if verdict is None:
        return "n/a"
    return f"{'pass' if verdict else 'FAIL'} {passed}/{total}"


def _expectations(found: dict[str, list[conformance.Check]]) -> list[str]:
    """What is expected: docker fails (a); every CNI mode passes (a), (b), (c)."""
    out = []
    for mode, checks in found.items():
        s = conformance.summarize(checks)
        if mode == "docker":
            ok = s["a"][2] is False and s["container-to-container"][2] is True
            out.append(f"{'ok' if ok else 'UNEXPECTED'}: docker fails (a) (pods of different nodes share "
                       f"172.17.0.0/16 and leave the node masqueraded) and passes container-to-container")
        else:
            ok = all(s[k][2] is True for k in conformance.REQUIREMENTS)
            out.append(f"{'ok' if ok else 'UNEXPECTED'}: {mode} passes (a), (b) and (c)")
    return out


if __name__ == "__main__":
    sys.exit(experiment_script.main(run, build_parser()))
