"""Test-session settings shared by tests/ and parity_tests/.

XLA's persistent compilation cache, one directory per test session (set before JAX is imported; pytest-xdist
workers and the CLI subprocesses the tests start inherit it): the CLI tests run the same small models in many
processes, and each would otherwise compile the same graphs again (about half of a CLI run's time on two
cores). JAX keys the cache on the computation, its options and the JAX/XLA version, so a hit is the same
executable.

Goldens (parity_tests/goldens.py): a test marked ``goldens`` is skipped -- or failed under
FLAXDET_REQUIRE_GOLDENS=1 -- before its fixtures run when the goldens are missing; an unmarked test that
reaches them through the helpers fails."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="flaxdet-test-xla-"))
# cache every compile, also the many sub-second ones of a model's random init, which each CLI run repeats
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from parity_tests import goldens  # noqa: E402  (after the environment above; imports no JAX)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    goldens.current_test = item
    try:
        yield
    finally:
        goldens.current_test = None


def pytest_runtest_setup(item):
    if item.get_closest_marker(goldens.MARKER) is not None:
        goldens.require_goldens()
