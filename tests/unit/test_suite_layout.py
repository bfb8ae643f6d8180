"""The test suite itself: every test module has a basename of its own, and CI's lanes name
real paths, each in one lane.

The test folders have no ``__init__.py`` (pytest's rootdir import), so two modules named alike
in different folders stop the whole collection with "import file mismatch". That has
happened twice when work from separate branches met; this fails on the branch that adds the
second one, naming both.
"""

from __future__ import annotations

import collections
import re
import shlex
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    by_name: dict[str, list[str]] = collections.defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"


def _ci_array(text: str, name: str) -> list[str]:
    match = re.search(rf"^{name}=\((.*?)\)", text, flags=re.M | re.S)
    assert match, f".ci/run defines no {name}=(...) array"
    return shlex.split(match.group(1))


def test_ci_lanes_name_existing_paths_each_once() -> None:
    """.ci/run's lane 2 runs FLOWS, lane 1 (after the cluster tests) LATE_FLOWS, and lane 3
    everything with both ignored: a misspelt path would fail its lane and leave the module it
    meant in lane 3 as well, and a path in both arrays would run its tests twice."""
    text = (TESTS.parent / ".ci" / "run").read_text()
    flows, late = _ci_array(text, "FLOWS"), _ci_array(text, "LATE_FLOWS")
    for path in flows + late:
        assert (TESTS.parent / path).is_file(), f".ci/run names {path}, which does not exist"
    assert not set(flows) & set(late), set(flows) & set(late)
    assert len(set(flows + late)) == len(flows + late)
    assert '"${FLOWS[@]/#/--ignore=}"' in text and '"${LATE_FLOWS[@]/#/--ignore=}"' in text
