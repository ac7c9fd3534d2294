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


def test_the_tests_sharing_a_costly_fixture_make_it_once_on_one_worker(pytester: pytest.Pytester, monkeypatch):
    """With two workers, the tests that use a shared session fixture (a sweep) or a shared module fixture (trained
    checkpoints) each run on one worker, so the fixture is made once, not once per worker. Checks the conftest hook
    and the pytest / pytest-xdist pair (pytest 9.2 silently broke `--dist loadgroup`: pytest-dev/pytest-xdist#1386)."""
    from tests.conftest import SHARED_MODULE_FIXTURES, SHARED_SESSION_FIXTURES

    made = pytester.path / "made.txt"
    session, module = SHARED_SESSION_FIXTURES[0], sorted(SHARED_MODULE_FIXTURES)[0]
    pytester.makeconftest(
        f"""
import os
import pytest
from tests.conftest import pytest_collection_modifyitems  # the hook under test

def _made(name):
    with open({str(made)!r}, "a") as f:
        f.write(name + " " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.fixture(scope="session")
def {session}():
    _made("{session}")

@pytest.fixture(scope="module")
def {module}():
    _made("{module}")
"""
    )
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    body = "import time\n\n" + "".join(
        f"def test_{i}({session}):\n    time.sleep(0.05)\n\ndef test_plain_{i}():\n    time.sleep(0.05)\n\n"
        for i in range(12)
    )
    pytester.makepyfile(test_a=body, test_b=body.replace(session, module))
    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))  # `tests.conftest` in the workers
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=48)
    lines = sorted(made.read_text().splitlines())
    assert [line.split()[0] for line in lines] == sorted([module, session]), lines  # each made once
