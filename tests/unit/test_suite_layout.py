"""The test suite itself: every test module has a basename of its own.

The test folders have no ``__init__.py`` (pytest's rootdir import), so two modules named alike
in different folders stop the whole collection with "import file mismatch". That has
happened twice when work from separate branches met; this fails on the branch that adds the
second one, naming both.
"""

from __future__ import annotations

import collections
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    by_name: dict[str, list[str]] = collections.defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
