"""Shared pytest fixtures.

Tests that check identities to float64 precision use the ``x64`` fixture, which enables 64-bit
JAX arrays for that test only (the rest of the suite runs in float32, as training does).
"""

import contextlib
import os
import tempfile

# A persistent XLA compilation cache shared by this session, its xdist workers and the
# subprocesses tests start (they inherit the variable): the same U-Net train step compiled by
# several tests is compiled once. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddpm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


def _enable_x64():
    if hasattr(jax, "enable_x64"):  # jax >= 0.7: a context manager on jax itself
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


@pytest.fixture
def x64():
    with _enable_x64():
        yield


@contextlib.contextmanager
def x64_context():
    with _enable_x64():
        yield
