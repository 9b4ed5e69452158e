"""Host-local IPAM: allocation order, idempotence, state on disk, concurrency.

Runs without root: every store lives under pytest's tmp_path.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from k8snetlab.errors import K8sNetLabError
from k8snetlab.ipam import (Allocation, HostLocalStore, IPAMError, Range,
                            rangesets_from_conf)

NET = "k8s-pod-network"
A = IPv4Address


@pytest.fixture
def store(tmp_path):
    return HostLocalStore(tmp_path, NET)


def r24(**kw) -> list[Range]:
    return [Range.from_conf({"subnet": "10.244.1.0/24", **kw})]


# ------------------------------------------------------------------------ Range

def test_range_defaults_like_host_local():
    r = Range(IPv4Network("10.244.1.0/24"))
    assert r.gateway == A("10.244.1.1")
    assert r.range_start == A("10.244.1.1")
    assert r.range_end == A("10.244.1.254")


def test_range_from_conf_keys_and_host_bits():
    r = Range.from_conf({"subnet": "10.10.0.5/16", "rangeStart": "10.10.1.20",
                         "rangeEnd": "10.10.3.50", "gateway": "10.10.0.254"})
    assert r == Range(IPv4Network("10.10.0.0/16"), A("10.10.1.20"), A("10.10.3.50"),
                      A("10.10.0.254"))


@pytest.mark.parametrize("conf, code", [
    ({"subnet": "10.244.1.0/24", "rangeStart": "10.244.2.5"}, 7),
    ({"subnet": "10.244.1.0/24", "rangeEnd": "10.0.0.1"}, 7),
    ({"subnet": "10.244.1.0/24", "gateway": "192.168.0.1"}, 7),
    ({"subnet": "10.244.1.0/24", "gateway": "10.244.1.255"}, 7),
    ({"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.50", "rangeEnd": "10.244.1.10"}, 7),
    ({"subnet": "10.244.1.0/31"}, 7),
    ({"subnet": "fd00::/64"}, 7),
    ({"subnet": "not-a-cidr"}, 7),
    ({"rangeStart": "10.244.1.5"}, 7),
    ({"subnet": "10.244.1.0/24", "rangestart": "10.244.1.5"}, 2),
])
def test_range_validation(conf, code):
    with pytest.raises(IPAMError) as ei:
        Range.from_conf(conf)
    assert ei.value.code == code
    assert isinstance(ei.value, K8sNetLabError)


def test_rangesets_from_conf_both_forms():
    sets = rangesets_from_conf({"type": "host-local", "ranges": [
        [{"subnet": "10.244.1.0/24"}, {"subnet": "172.16.5.0/24"}],
        [{"subnet": "10.250.0.0/24"}]]})
    assert [[str(r.subnet) for r in s] for s in sets] == [
        ["10.244.1.0/24", "172.16.5.0/24"], ["10.250.0.0/24"]]
    legacy = rangesets_from_conf({"type": "host-local", "subnet": "10.1.0.0/16",
                                  "routes": [{"dst": "0.0.0.0/0"}]})
    assert legacy == [[Range(IPv4Network("10.1.0.0/16"))]]
    with pytest.raises(IPAMError):
        rangesets_from_conf({"type": "host-local"})


# ------------------------------------------------------------------- allocation

def test_first_allocation_is_after_gateway(store):
    a = store.allocate("c1", "eth0", r24())
    assert isinstance(a, Allocation)
    assert a.address == IPv4Interface("10.244.1.2/24")
    assert a.gateway == A("10.244.1.1")
    assert a.range.subnet == IPv4Network("10.244.1.0/24")


def test_range_start_and_end_honoured(store):
    ranges = r24(rangeStart="10.244.1.100", rangeEnd="10.244.1.102")
    got = [store.allocate(f"c{i}", "eth0", ranges).address.ip for i in range(3)]
    assert got == [A("10.244.1.100"), A("10.244.1.101"), A("10.244.1.102")]
    with pytest.raises(IPAMError):
        store.allocate("c3", "eth0", ranges)


def test_gateway_never_handed_out(store):
    ranges = r24(rangeStart="10.244.1.10", rangeEnd="10.244.1.14", gateway="10.244.1.12")
    got = {store.allocate(f"c{i}", "eth0", ranges).address.ip for i in range(4)}
    assert A("10.244.1.12") not in got and len(got) == 4
    with pytest.raises(IPAMError):
        store.allocate("c9", "eth0", ranges)


def test_network_and_broadcast_skipped_even_inside_range(tmp_path):
    s = HostLocalStore(tmp_path, NET)
    ranges = [Range(IPv4Network("10.9.0.0/30"), A("10.9.0.0"), A("10.9.0.3"), A("10.9.0.1"))]
    assert s.allocate("c1", "eth0", ranges).address.ip == A("10.9.0.2")
    with pytest.raises(IPAMError):
        s.allocate("c2", "eth0", ranges)


def test_exhaustion_error_names_range_and_code(store):
    ranges = r24(rangeStart="10.244.1.2", rangeEnd="10.244.1.3")
    store.allocate("a", "eth0", ranges)
    store.allocate("b", "eth0", ranges)
    with pytest.raises(IPAMError) as ei:
        store.allocate("c", "eth0", ranges)
    assert ei.value.code == IPAMError.TRY_AGAIN_LATER == 11
    assert "10.244.1.0/24 (10.244.1.2-10.244.1.3)" in str(ei.value)
    assert NET in str(ei.value)


def test_allocate_is_idempotent_per_container_and_ifname(store):
    first = store.allocate("c1", "eth0", r24())
    again = store.allocate("c1", "eth0", r24())
    assert again == first
    other_if = store.allocate("c1", "net1", r24())
    assert other_if.address != first.address
    assert len(store.allocations()) == 2


def test_release_is_idempotent(store):
    ip = store.allocate("c1", "eth0", r24()).address.ip
    assert store.release("c1", "eth0") == [ip]
    assert store.release("c1", "eth0") == []
    assert store.release("never-there", "eth0") == []
    assert store.get("c1", "eth0") is None
    assert store.allocations() == {}


def test_release_on_missing_state_dir_creates_nothing(tmp_path):
    s = HostLocalStore(tmp_path, "absent")
    assert s.release("c1", "eth0") == []
    assert s.get("c1", "eth0") is None
    assert s.allocations() == {}
    assert s.gc(set()) == []
    assert not (tmp_path / "absent").exists()


def test_round_robin_continues_after_last_reserved(store):
    a, b, c = (store.allocate(x, "eth0", r24()).address.ip for x in "abc")
    assert (a, b, c) == (A("10.244.1.2"), A("10.244.1.3"), A("10.244.1.4"))
    store.release("a", "eth0")
    store.release("c", "eth0")
    # not the freed .2 nor the freed .4: the cursor is at .4, so .5 comes next
    assert store.allocate("d", "eth0", r24()).address.ip == A("10.244.1.5")
    assert (store.dir / "last_reserved_ip.0").read_text() == "10.244.1.5"


def test_round_robin_wraps_to_freed_addresses(store):
    ranges = r24(rangeStart="10.244.1.10", rangeEnd="10.244.1.12")
    for x in "abc":
        store.allocate(x, "eth0", ranges)
    store.release("a", "eth0")
    assert store.allocate("d", "eth0", ranges).address.ip == A("10.244.1.10")


def test_round_robin_across_ranges_of_a_set(store):
    ranges = [Range.from_conf({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.253"}),
              Range.from_conf({"subnet": "10.2.0.0/24"})]
    got = [store.allocate(f"c{i}", "eth0", ranges) for i in range(3)]
    assert [str(g.address) for g in got] == ["10.1.0.253/24", "10.1.0.254/24", "10.2.0.2/24"]
    assert got[2].gateway == A("10.2.0.1") and got[2].range == ranges[1]


def test_rangeset_index_names_the_cursor_file(store):
    store.allocate("c1", "eth0", r24(), rangeset_index=1)
    assert (store.dir / "last_reserved_ip.1").read_text() == "10.244.1.2"
    assert not (store.dir / "last_reserved_ip.0").exists()
    with pytest.raises(IPAMError):
        store.allocate("c2", "eth0", r24(), rangeset_index="../x")  # type: ignore[arg-type]


def test_overlapping_ranges_rejected(store):
    ranges = [Range.from_conf({"subnet": "10.1.0.0/24"}),
              Range.from_conf({"subnet": "10.1.0.0/25"})]
    with pytest.raises(IPAMError) as ei:
        store.allocate("c1", "eth0", ranges)
    assert ei.value.code == 7


def test_requested_ip(store):
    a = store.allocate("c1", "eth0", r24(), request=A("10.244.1.77"))
    assert a.address == IPv4Interface("10.244.1.77/24")
    # the cursor moves to the requested address, as in host-local
    assert store.allocate("c2", "eth0", r24()).address.ip == A("10.244.1.78")
    # same owner asking again: the same address
    assert store.allocate("c1", "eth0", r24(), request=A("10.244.1.77")) == a


def test_requested_ip_taken_by_another_container(store):
    store.allocate("c1", "eth0", r24(), request=A("10.244.1.77"))
    with pytest.raises(IPAMError) as ei:
        store.allocate("c2", "eth0", r24(), request=A("10.244.1.77"))
    assert ei.value.code == 11 and "c1/eth0" in str(ei.value)
    assert store.get("c2", "eth0") is None


@pytest.mark.parametrize("ip", ["10.244.1.1", "10.244.2.5", "10.244.1.255"])
def test_requested_ip_gateway_or_outside_rejected(store, ip):
    with pytest.raises(IPAMError) as ei:
        store.allocate("c1", "eth0", r24(), request=A(ip))
    assert ei.value.code == 7
    assert store.allocations() == {}


def test_requested_ip_differs_from_held_one(store):
    store.allocate("c1", "eth0", r24())
    with pytest.raises(IPAMError, match="already holds 10.244.1.2"):
        store.allocate("c1", "eth0", r24(), request=A("10.244.1.50"))


@pytest.mark.parametrize("cid, ifname", [("", "eth0"), ("c\n1", "eth0"), ("c1", ""),
                                         ("c1", "eth0\nx")])
def test_bad_container_id_or_ifname(store, cid, ifname):
    with pytest.raises(IPAMError) as ei:
        store.allocate(cid, ifname, r24())
    assert ei.value.code == 4


def test_bad_network_name(tmp_path):
    for name in ("", "..", "a/b"):
        with pytest.raises(IPAMError):
            HostLocalStore(tmp_path, name)


# ------------------------------------------------------------------ state on disk

def test_file_format(store):
    store.allocate("abc123", "eth0", r24())
    assert (store.dir / "10.244.1.2").read_text() == "abc123\neth0"
    assert (store.dir / "last_reserved_ip.0").read_text() == "10.244.1.2"
    assert (store.dir / "lock").exists()
    assert sorted(p.name for p in store.dir.iterdir()) == [
        "10.244.1.2", "last_reserved_ip.0", "lock"]


def test_state_survives_a_new_store_instance(tmp_path):
    s1 = HostLocalStore(tmp_path, NET)
    a = s1.allocate("c1", "eth0", r24())
    s1.allocate("c2", "eth0", r24())
    s2 = HostLocalStore(tmp_path, NET)
    assert s2.get("c1", "eth0") == a.address.ip
    assert s2.allocate("c1", "eth0", r24()) == a
    assert s2.allocate("c3", "eth0", r24()).address.ip == A("10.244.1.4")
    assert s2.allocations() == {A("10.244.1.2"): ("c1", "eth0"),
                                A("10.244.1.3"): ("c2", "eth0"),
                                A("10.244.1.4"): ("c3", "eth0")}


def test_networks_are_separate(tmp_path):
    a = HostLocalStore(tmp_path, "net-a").allocate("c1", "eth0", r24())
    b = HostLocalStore(tmp_path, "net-b").allocate("c1", "eth0", r24())
    assert a.address == b.address


def test_gc_keeps_only_valid(store):
    for cid in ("keep", "drop1", "drop2"):
        store.allocate(cid, "eth0", r24())
    store.allocate("keep", "net1", r24())
    released = store.gc({("keep", "eth0")})
    assert released == [A("10.244.1.3"), A("10.244.1.4"), A("10.244.1.5")]
    assert store.allocations() == {A("10.244.1.2"): ("keep", "eth0")}
    assert (store.dir / "lock").exists() and (store.dir / "last_reserved_ip.0").exists()
    assert store.gc(set()) == [A("10.244.1.2")]


def test_legacy_and_crlf_files_understood(store):
    store.dir.mkdir(parents=True)
    (store.dir / "10.244.1.20").write_text("old-id")          # host-local before ifname
    (store.dir / "10.244.1.21").write_text("new-id\r\neth0")  # today's host-local
    assert store.allocations() == {A("10.244.1.20"): ("old-id", ""),
                                   A("10.244.1.21"): ("new-id", "eth0")}
    assert store.get("old-id", "eth0") == A("10.244.1.20")
    assert store.gc({("old-id", "eth0"), ("new-id", "eth0")}) == []
    assert store.release("old-id", "eth0") == [A("10.244.1.20")]
    assert store.release("new-id", "eth0") == [A("10.244.1.21")]


def test_unknown_files_ignored_and_left_alone(store, caplog):
    store.allocate("c1", "eth0", r24())
    (store.dir / "README").write_text("notes")
    (store.dir / "fd00::5").write_text("v6-id\neth0")   # IPv6: not this store's business
    (store.dir / "10.244.1.9.bak").write_text("x")
    (store.dir / "sub").mkdir()
    assert store.allocations() == {A("10.244.1.2"): ("c1", "eth0")}
    assert store.allocate("c2", "eth0", r24()).address.ip == A("10.244.1.3")
    store.gc(set())
    for name in ("README", "fd00::5", "10.244.1.9.bak", "sub"):
        assert (store.dir / name).exists()


def test_corrupt_ip_file_stays_reserved_reported_and_gcable(store, caplog):
    store.dir.mkdir(parents=True)
    (store.dir / "10.244.1.2").write_bytes(b"")              # crashed foreign writer
    (store.dir / "10.244.1.3").write_bytes(b"\xff\xfe\x00")   # garbage
    (store.dir / "10.244.1.4").write_text("a\nb\nc")          # too many lines
    with caplog.at_level(logging.WARNING, logger="k8snetlab.ipam"):
        owners = store.allocations()
    assert owners == {A("10.244.1.2"): ("", ""), A("10.244.1.3"): ("", ""),
                      A("10.244.1.4"): ("", "")}
    assert "10.244.1.2" in caplog.text and "run gc" in caplog.text
    # never handed out while the file is there
    assert store.allocate("c1", "eth0", r24()).address.ip == A("10.244.1.5")
    assert store.gc({("c1", "eth0")}) == [A("10.244.1.2"), A("10.244.1.3"),
                                          A("10.244.1.4")]


def test_corrupt_last_reserved_restarts_round_robin(store):
    store.dir.mkdir(parents=True)
    (store.dir / "last_reserved_ip.0").write_text("garbage")
    assert store.allocate("c1", "eth0", r24()).address.ip == A("10.244.1.2")
    # a cursor outside the ranges (config changed) also restarts at the range start
    (store.dir / "last_reserved_ip.0").write_text("192.168.7.7")
    assert store.allocate("c2", "eth0", r24()).address.ip == A("10.244.1.3")


def test_leftover_temp_file_of_a_crashed_writer_is_removed(store):
    store.dir.mkdir(parents=True)
    (store.dir / ".tmp-999999-dead").write_text("c9\neth0")
    assert store.allocations() == {}
    store.allocate("c1", "eth0", r24())
    assert not (store.dir / ".tmp-999999-dead").exists()


def test_remove_all(store, tmp_path):
    store.allocate("c1", "eth0", r24())
    store.remove_all()
    assert not store.dir.exists() and tmp_path.exists()
    store.remove_all()                        # idempotent
    assert store.allocate("c1", "eth0", r24()).address.ip == A("10.244.1.2")


def test_io_failure_is_an_ipam_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = HostLocalStore(blocker, NET)
    with pytest.raises(IPAMError) as ei:
        s.allocate("c1", "eth0", r24())
    assert ei.value.code == 5 and str(s.dir) in str(ei.value)


# -------------------------------------------------------------------- concurrency

PROCS, PER_PROC = 8, 25


def _allocate_many(data_dir: str, worker: int, barrier, out) -> None:
    try:
        store = HostLocalStore(data_dir, NET)
        ranges = r24()
        barrier.wait(timeout=60)
        got = []
        for i in range(PER_PROC):
            got.append(str(store.allocate(f"w{worker}-c{i}", "eth0", ranges).address.ip))
        out.put((worker, got))
    except BaseException as e:       # report instead of leaving the parent waiting
        out.put((worker, f"{type(e).__name__}: {e}"))


def test_concurrent_processes_never_share_an_ip(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(tmp_path), w, barrier, out))
             for w in range(PROCS)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    failed = {w: got for w, got in results.items() if isinstance(got, str)}
    assert not failed
    ips = [ip for got in results.values() for ip in got]
    assert len(ips) == PROCS * PER_PROC == len(set(ips))
    owners = HostLocalStore(tmp_path, NET).allocations()
    assert len(owners) == PROCS * PER_PROC
    assert {str(ip) for ip in owners} == set(ips)
    assert all(owners[A(ip)] == (f"w{w}-c{i}", "eth0")
               for w, got in results.items() for i, ip in enumerate(got))
    assert [p.name for p in (tmp_path / NET).iterdir() if p.name.startswith(".tmp")] == []


def test_concurrent_threads_never_share_an_ip(tmp_path):
    store = HostLocalStore(tmp_path, NET)      # one instance shared by all threads
    barrier = threading.Barrier(PROCS)
    results: dict[int, list[IPv4Address]] = {}
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            barrier.wait()
            results[w] = [store.allocate(f"t{w}-c{i}", "eth0", r24()).address.ip
                          for i in range(PER_PROC)]
        except BaseException as e:   # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(PROCS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    ips = [ip for got in results.values() for ip in got]
    assert len(ips) == PROCS * PER_PROC == len(set(ips))
    assert len(store.allocations()) == PROCS * PER_PROC


def test_concurrent_allocate_and_release_keep_state_consistent(tmp_path):
    """Threads churning (allocate, release) never see two owners of one address."""
    store = HostLocalStore(tmp_path, NET)
    ranges = r24(rangeStart="10.244.1.2", rangeEnd="10.244.1.20")
    errors: list[BaseException] = []

    def churn(w: int) -> None:
        try:
            for i in range(30):
                ip = store.allocate(f"t{w}", "eth0", ranges).address.ip
                assert store.allocations()[ip] == (f"t{w}", "eth0")
                assert store.release(f"t{w}", "eth0") == [ip]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert store.allocations() == {}
