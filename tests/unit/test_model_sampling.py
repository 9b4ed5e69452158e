"""check-model's pod pairs: all of them in small clusters, a linear sample in big ones that
still asks about every pod, from every pod."""
from collections import Counter

from k8snetlab.conformance import sample_pairs


def test_small_clusters_ask_every_pair():
    pairs = sample_pairs(5, 5, 200)
    assert len(pairs) == 20 and all(i != j for i, j in pairs)
    assert len(sample_pairs(3, 7, 200)) == 21           # nodes asking pods: all


def test_a_thousand_pods_take_a_linear_sample_covering_everyone():
    pairs = sample_pairs(1000, 1000, 20)
    assert len(pairs) == 20_000                         # not 999,000
    assert all(i != j for i, j in pairs)
    assert len(set(pairs)) == len(pairs)
    sources, targets = Counter(i for i, _ in pairs), Counter(j for _, j in pairs)
    assert set(sources) == set(range(1000)) and set(targets) == set(range(1000))
    assert max(targets.values()) - min(targets.values()) <= 1


def test_nodes_asking_pods_cover_every_pod():
    pairs = sample_pairs(100, 1000, 20)
    assert len(pairs) == 2000
    assert set(j for _, j in pairs) == set(range(1000))
