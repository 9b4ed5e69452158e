"""pytest imports test files by basename (rootdir-relative, no packages): two files of one
name under tests/unit and tests/integration stop the whole collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_files_share_a_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], \
        f"test files sharing a basename: {sorted(n for n, k in names.items() if k > 1)}"
