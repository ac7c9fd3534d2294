"""The fast tier: `pytest -m "not slow"` starts no Ray, no MLflow server and no browser.

tests/conftest.py marks every test that uses one of SLOW_FIXTURES (directly or through another fixture) slow
at collection; these tests run that hook on a small suite of its own, and check that the names in the set are
the fixtures that start those things.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import SLOW_FIXTURES

TESTS = Path(__file__).resolve().parent


def test_a_test_using_a_slow_fixture_is_marked_slow_and_left_out_of_the_fast_tier(pytester: pytest.Pytester):
    fixtures = "\n".join(f"@pytest.fixture\ndef {name}():\n    return '{name}'\n" for name in sorted(SLOW_FIXTURES))
    pytester.makeconftest(
        f"""
import pytest
from tests.conftest import pytest_collection_modifyitems  # the hook under test

{fixtures}

@pytest.fixture
def through_another(mlflow_server):
    return mlflow_server
"""
    )
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\naddopts = --strict-markers\n")
    uses = "\n".join(f"def test_uses_{name}({name}):\n    pass\n" for name in sorted(SLOW_FIXTURES))
    pytester.makepyfile(
        f"""
import pytest

def test_plain(tmp_path):
    pass

{uses}

def test_through_another(through_another):
    pass

@pytest.mark.slow
def test_marked_by_hand():
    pass
"""
    )
    fast = pytester.runpytest("-m", "not slow", "-p", "no:cacheprovider")
    fast.assert_outcomes(passed=1, deselected=len(SLOW_FIXTURES) + 2)
    fast.stdout.fnmatch_lines(["*1 passed*"])
    slow = pytester.runpytest("-m", "slow", "-p", "no:cacheprovider", "-v")
    slow.assert_outcomes(passed=len(SLOW_FIXTURES) + 2, deselected=1)
    slow.stdout.no_fnmatch_line("*test_plain PASSED*")


def test_every_slow_fixture_is_a_fixture_of_the_suite():
    """A renamed fixture would leave the set silently: each name must still be defined in tests/."""
    defined = set()
    for path in TESTS.glob("*.py"):
        defined |= set(re.findall(r"@pytest\.fixture[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", path.read_text()))
    assert defined >= SLOW_FIXTURES, sorted(SLOW_FIXTURES - defined)
