"""Shared pytest fixtures.

Tests that check identities to float64 precision use the ``x64`` fixture, which enables 64-bit
JAX arrays for that test only (the rest of the suite runs in float32, as training does).
"""

import contextlib
import os

import jax
import pytest

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
