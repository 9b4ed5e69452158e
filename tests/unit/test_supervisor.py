"""The kubelet's container supervision, without root: restartPolicy decisions, the
CrashLoopBackOff delays, and a supervisor restarting real (local) processes and telling
who became not ready and ready again."""

from __future__ import annotations

import subprocess
import threading
from types import SimpleNamespace

import pytest

from k8snetlab import supervisor
from k8snetlab.manifests import ContainerSpec, PodSpec, parse_workload
from k8snetlab.errors import SpecError


def test_restart_policy_decisions():
    assert supervisor.should_restart("Always", 0) and supervisor.should_restart("Always", -9)
    assert supervisor.should_restart("OnFailure", 1) and supervisor.should_restart("OnFailure", -9)
    assert not supervisor.should_restart("OnFailure", 0)
    assert not supervisor.should_restart("Never", 1)


def test_backoff_doubles_from_ten_seconds_to_five_minutes():
    delays, d = [], 0.0
    for _ in range(8):
        delays.append(d)
        d = supervisor.next_backoff(d)
    assert delays == [0.0, 10, 20, 40, 80, 160, 300, 300]


def test_restart_policy_is_parsed_and_checked():
    pod = {"kind": "Pod", "metadata": {"name": "p"},
           "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c", "command": ["true"]}]}}
    assert parse_workload(pod, "x").template.restart_policy == "OnFailure"
    pod["spec"]["restartPolicy"] = "Sometimes"
    with pytest.raises(SpecError, match="restartPolicy.*Always, OnFailure, Never"):
        parse_workload(pod, "x")
    dep = {"kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "command": ["true"]}]}}}}
    assert parse_workload(dep, "x").pods(1)[0].restart_policy == "Always"
    dep["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    with pytest.raises(SpecError, match="only 'Always'"):
        parse_workload(dep, "x")


class FakePod:
    """A pod whose containers are local processes (no namespaces)."""

    def __init__(self, name: str, policy: str, argv: list[str]):
        self.name, self.container_id, self.result = name, f"id-{name}", object()
        self.spec = PodSpec(name, containers=(ContainerSpec("c", command=tuple(argv)),), restart_policy=policy)
        self.ready, self.stopping, self.restarts = True, False, {}
        self.lifecycle = threading.Lock()
        self.containers: dict = {}
        self.start_container(self.spec.containers[0], None)

    def start_container(self, spec, log_dir):
        p = subprocess.Popen(list(spec.argv))
        self.containers[spec.name] = SimpleNamespace(process=p, pid=p.pid)

    def kill(self):
        for c in self.containers.values():
            if c.process.poll() is None:
                c.process.kill()
            c.process.wait()


@pytest.fixture
def pods():
    made: dict[str, FakePod] = {}
    yield made
    for p in made.values():
        p.kill()


def test_supervisor_restarts_by_policy_and_reports_readiness(pods):
    pods["always"] = FakePod("always", "Always", ["sleep", "30"])
    pods["never"] = FakePod("never", "Never", ["sleep", "30"])
    pods["onfailure-ok"] = FakePod("onfailure-ok", "OnFailure", ["true"])
    told: list[list[str]] = []
    sup = supervisor.ContainerSupervisor(lambda: pods, None, lambda ps: told.append(sorted(p.name for p in ps)),
                                         backoff_initial=0.0)
    pods["onfailure-ok"].containers["c"].process.wait()
    for name in ("always", "never"):
        pods[name].containers["c"].process.kill()
        pods[name].containers["c"].process.wait()
    first = pods["always"].containers["c"].pid
    sup.check_once()                     # all three exited: not ready; only 'always' restarted
    assert told == [["always", "never", "onfailure-ok"]]
    assert pods["always"].restarts == {"c": 1} and pods["always"].containers["c"].pid != first
    assert pods["never"].restarts == {} and pods["onfailure-ok"].restarts == {}
    sup.check_once()                     # the restarted one runs (no ports to wait for): ready
    assert told[-1] == ["always"] and pods["always"].ready
    assert not pods["never"].ready and not pods["onfailure-ok"].ready
    assert ("always", "c", "restarted (1)") in [(e[1], e[2], e[3]) for e in sup.events]


def test_supervisor_waits_out_the_backoff(pods):
    pods["p"] = FakePod("p", "Always", ["false"])
    sup = supervisor.ContainerSupervisor(lambda: pods, None, lambda ps: None, backoff_initial=60.0)
    pods["p"].containers["c"].process.wait()
    sup.check_once()                     # first restart at once
    assert pods["p"].restarts == {"c": 1}
    pods["p"].containers["c"].process.wait()
    sup.check_once()                     # second: 60 s of back-off first
    sup.check_once()
    assert pods["p"].restarts == {"c": 1}
    assert any(e[3] == "back-off 60 s" for e in sup.events)


def test_a_stopping_pod_is_left_alone(pods):
    pods["p"] = FakePod("p", "Always", ["true"])
    pods["p"].containers["c"].process.wait()
    pods["p"].stopping = True
    sup = supervisor.ContainerSupervisor(lambda: pods, None, lambda ps: None)
    assert sup.check_once() == [] and pods["p"].restarts == {}
