"""The platform profile (``ddpm_jax.platform_profile``): what each profile sets up, that the
accelerator profile runs none of the CPU set-up, and that both compute the same loss and gradients.

The accelerator profile is resolved by name here (this machine has no GPU or TPU): resolution
from the backend is checked through ``JAX_PLATFORMS``, and what the profile does to a process
(environment, XLA flags, device count, re-execution) is observed in fresh subprocesses.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import objectives, platform_profile, schedules
from ddpm_jax.models import model_from_config
from helpers import REPO

from configs import mnist as mnist_config


@pytest.mark.parametrize("platforms, expected", [("cpu", "cpu"), ("cuda", "accelerator"), ("tpu", "accelerator"),
                                                 ("cuda,cpu", "accelerator"), ("cpu,", "cpu")])
def test_auto_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert platform_profile.resolve("auto").name == expected


def test_auto_without_jax_platforms_looks_for_plugins(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(platform_profile, "_installed", lambda m: False)
    assert platform_profile.resolve("auto").name == "cpu"
    monkeypatch.setattr(platform_profile, "_installed", lambda m: m == "libtpu")
    assert platform_profile.resolve("auto").name == "accelerator"


def test_named_profiles_and_a_bad_name():
    cpu, acc = platform_profile.resolve("cpu"), platform_profile.resolve("accelerator")
    assert (cpu.conv_impl, cpu.fused_group_norm, cpu.tune_malloc, cpu.virtual_cpu_devices) == ("phases", True, True, True)
    assert (acc.conv_impl, acc.fused_group_norm, acc.tune_malloc, acc.virtual_cpu_devices) == ("xla", False, False, False)
    assert not acc.dispatch_window and not acc.sync_checkpoints
    with pytest.raises(ValueError, match="unknown platform 'gpu'"):
        platform_profile.resolve("gpu")


_PROBE = """
import json, os, sys
from ddpm_jax import platform_profile
p = platform_profile.setup(sys.argv[1], cpu_devices=int(sys.argv[2]), batch_sizes=[100])
import jax
print(json.dumps({"profile": p.name, "glibc": os.environ.get("GLIBC_TUNABLES"), "xla_flags": os.environ.get("XLA_FLAGS"),
                  "devices": jax.local_device_count(), "window": platform_profile.dispatch_window().enabled,
                  "async": platform_profile.async_checkpoints()}))
"""


def _probe(profile, cpu_devices):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _PROBE, profile, str(cpu_devices)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_accelerator_profile_runs_none_of_the_cpu_setup():
    """No glibc re-execution, no XLA_FLAGS, JAX's own device count (one CPU device), no waits
    between steps, asynchronous checkpoints — even with a CPU device count asked for."""
    got = _probe("accelerator", 2)
    assert got == {"profile": "accelerator", "glibc": None, "xla_flags": None, "devices": 1, "window": False,
                   "async": True}


def test_cpu_profile_sets_the_process_up():
    """The CPU profile re-executes with the malloc settings, makes 2 devices (asked for), raises
    XLA:CPU's collective time-out, and with two devices sharing the thread pool waits between
    steps and saves synchronously."""
    got = _probe("cpu", 2)
    assert got["profile"] == "cpu" and got["devices"] == 2 and got["window"] and not got["async"]
    assert got["glibc"] and "glibc.malloc" in got["glibc"]
    assert "--xla_cpu_collective_call_terminate_timeout_seconds" in got["xla_flags"]


def test_models_follow_the_profile():
    c = mnist_config.get_config()
    assert c.model.conv_impl == "auto"
    cpu = model_from_config(c.model, (28, 28, 1), platform_profile.resolve("cpu"))
    acc = model_from_config(c.model, (28, 28, 1), platform_profile.resolve("accelerator"))
    assert (cpu.conv_impl, cpu.fused_norm) == ("phases", True) and (acc.conv_impl, acc.fused_norm) == ("xla", False)
    with c.unlocked():
        c.model.conv_impl = "stride1"  # an explicit choice holds on either profile
    assert model_from_config(c.model, (28, 28, 1), platform_profile.resolve("accelerator")).conv_impl == "stride1"


def test_both_profiles_compute_the_same_loss_and_gradients():
    """configs/mnist.py's network under each profile, the same parameters (the trees are
    identical), batch, t and noise. They differ only in summation order (im2col and phase-split
    convolutions vs XLA's; GroupNorm statistics by matmul vs reductions), so they agree to float32
    rounding: sums of ≤ 576 products (3×3×64) per output, through 9 layers, bound the relative
    difference by ~1e-5 (measured: 1.2e-7 on the loss, 1.7e-6 of each parameter's largest gradient
    entry); we allow 1e-4 on the loss and 1e-4 of the largest gradient entry of each parameter,
    absolute, on the gradients (a wrong layer or norm moves them by far more)."""
    c = mnist_config.get_config()
    cpu = model_from_config(c.model, (28, 28, 1), platform_profile.resolve("cpu"))
    acc = model_from_config(c.model, (28, 28, 1), platform_profile.resolve("accelerator"))
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
    params = cpu.init(jax.random.PRNGKey(0), x0, jnp.ones((8,)))["params"]
    params_acc = acc.init(jax.random.PRNGKey(0), x0, jnp.ones((8,)))["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_acc)
    s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
    loss_fn = objectives.get_objective("eps")

    def loss(model, p):
        return loss_fn(lambda x, t: model.apply({"params": p}, x, t), s, x0, jax.random.PRNGKey(2))[0]

    (l_cpu, g_cpu), (l_acc, g_acc) = (jax.value_and_grad(lambda p, m=m: loss(m, p))(params) for m in (cpu, acc))
    assert abs(float(l_cpu) - float(l_acc)) <= 1e-4 * abs(float(l_cpu)), (l_cpu, l_acc)
    for a, b in zip(jax.tree_util.tree_leaves(g_cpu), jax.tree_util.tree_leaves(g_acc)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-30)
