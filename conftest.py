"""Test-session settings shared by tests/ and parity_tests/.

XLA's persistent compilation cache, one directory per test session (set before JAX is imported; pytest-xdist
workers and the CLI subprocesses the tests start inherit it): the CLI tests run the same small models in many
processes, and each would otherwise compile the same graphs again (about half of a CLI run's time on two
cores). JAX keys the cache on the computation, its options and the JAX/XLA version, so a hit is the same
executable."""
import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="flaxdet-test-xla-"))
