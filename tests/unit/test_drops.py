"""Kernel drop reasons: the reason names from the BTF dump, deltas per namespace (no root)."""

from k8snetlab import drops

BTF_RAW = """[12210] STRUCT 'x' size=4 vlen=0
[12211] ENUM 'skb_drop_reason' encoding=UNSIGNED size=4 vlen=5
\t'SKB_NOT_DROPPED_YET' val=0
\t'SKB_CONSUMED' val=1
\t'SKB_DROP_REASON_NOT_SPECIFIED' val=2
\t'SKB_DROP_REASON_NO_SOCKET' val=3
\t'SKB_DROP_REASON_TCP_OFOMERGE' val=40
[12212] ENUM 'skb_drop_reason_subsys' encoding=UNSIGNED size=4 vlen=1
\t'SKB_DROP_REASON_SUBSYS_CORE' val=0
"""


def test_reason_names_come_from_the_enum_only():
    names = drops.parse_reason_enum(BTF_RAW)
    assert names == {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
                     40: "TCP_OFOMERGE"}
    assert drops.reason_name(names, 3) == "NO_SOCKET"
    assert drops.reason_name(names, 99) == "REASON_99"
    assert drops.reason_name(names, (2 << 16) | 5) == "SUBSYS2_5"      # e.g. openvswitch's own


def test_delta_keeps_the_measured_namespaces_and_new_drops_only():
    names = drops.parse_reason_enum(BTF_RAW)
    before = {(7, 3): 10, (7, 2): 1, (8, 3): 5}
    after = {(7, 3): 14, (7, 2): 3, (8, 3): 9, (9, 40): 2}
    got = drops.delta(before, after, names, {7, 9})
    assert dict(got) == {(7, "NO_SOCKET"): 4, (7, "NOT_SPECIFIED"): 2, (9, "TCP_OFOMERGE"): 2}
    assert drops.delta(before, after, names)[(8, "NO_SOCKET")] == 4       # every namespace
    assert drops.split_noise({"NO_SOCKET": 4, "NOT_SPECIFIED": 2, "TCP_OFOMERGE": 2, "QUEUE_PURGE": 3}) == (6, 5)
