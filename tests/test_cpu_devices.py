"""One JAX device per CPU core (ddpm_jax.cpu_devices): how the count is chosen, that it is set only
before JAX starts and never over XLA_FLAGS, and that training and sampling on two CPU devices give
the numbers of one device (the speed it buys is measured in benchmarks/, docs/performance.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import cpu_devices
from helpers import REPO, STD_NAMES, FakeArray, cli_args, make_digits_like, write_dir


@pytest.mark.parametrize("requested, batches, cores, expected", [
    (0, [100], 2, 2),
    (0, [100], 3, 2),         # 3 does not divide 100
    (0, [100, 500], 16, 10),  # every batch must split into whole examples
    (0, [7], 4, 1),
    (0, [], 3, 3),
    (0, [0, -5, 100], 2, 2),  # bad sizes are the config validation's to report, not this choice's
    (5, [100], 2, 5),         # an explicit count is taken as given (the trainer checks divisibility)
])
def test_choose(requested, batches, cores, expected):
    assert cpu_devices.choose(requested, batches, cores=cores) == expected


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_choose_rejects_a_bad_count(bad):
    with pytest.raises(ValueError, match="cpu_devices"):
        cpu_devices.choose(bad, [100])


def test_available_cores_is_the_affinity_mask():
    assert cpu_devices.available_cores() == len(os.sched_getaffinity(0))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


CONFIGURE_SCRIPT = """
import sys, jax
sys.path.insert(0, {repo!r})
from ddpm_jax import cpu_devices
before = cpu_devices.configure(3, [12]) if {first!r} else None
n1 = jax.device_count()                  # starts the backends
after = cpu_devices.configure(2, [12])   # too late: left alone
print("RESULT", before, n1, after, jax.device_count())
"""


@pytest.mark.parametrize("xla_flags, first, expected", [
    ("", True, "3 3 None 3"),                                            # set before JAX starts
    ("", False, "None 1 None 1"),                                        # after: a warning, no change
    ("--xla_force_host_platform_device_count=4", True, "None 4 None 4"),  # XLA_FLAGS wins
])
def test_configure_only_before_jax_starts_and_never_over_xla_flags(xla_flags, first, expected):
    assert _script_result(CONFIGURE_SCRIPT.format(repo=REPO, first=first), xla_flags) == expected


def _script_result(script: str, xla_flags: str) -> str:
    """What ``script`` prints after "RESULT", run in a fresh Python with only these XLA_FLAGS."""
    env = _env(**({"XLA_FLAGS": xla_flags} if xla_flags else {}))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split("RESULT", 1)[1].strip()


FLAGS_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from ddpm_jax import cpu_devices
cpu_devices.configure({n}, [12])
import jax
print("RESULT", jax.device_count(), os.environ.get("XLA_FLAGS", "").split())
"""
TIMEOUT = f"{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}={cpu_devices.COLLECTIVE_TIMEOUT_S}"


@pytest.mark.parametrize("n, xla_flags, expected", [
    (2, "", f"2 ['{TIMEOUT}']"),                    # several devices: XLA's collective timeout raised
    (1, "", "1 []"),                                # one device: left alone
    (2, f"{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}=7",  # the user's choice wins
     f"2 ['{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}=7']"),
])
def test_several_cpu_devices_raise_the_collective_timeout(n, xla_flags, expected):
    assert _script_result(FLAGS_SCRIPT.format(repo=REPO, n=n), xla_flags) == expected


LATE_DEVICE_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from ddpm_jax import cpu_devices
cpu_devices.COLLECTIVE_TIMEOUT_S = 1
cpu_devices.configure(2, [2])
import jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

def f(x):  # device 0 computes for seconds before the all-reduce, device 1 arrives at once
    slow = lambda y: jax.lax.fori_loop(0, 1500, lambda k, z: jnp.sin(z) * 1.0001 + 0.1, y)
    return jax.lax.psum(jax.lax.cond(jax.lax.axis_index("d") == 0, slow, lambda y: y, x), "d")

g = jax.jit(jax.shard_map(f, mesh=Mesh(jax.devices(), ("d",)), in_specs=P("d"), out_specs=P()))
g(jnp.ones((2, 1000000))).block_until_ready()
print("RESULT finished")
"""


def test_the_collective_timeout_set_by_configure_reaches_xla():
    """configure() sets the flag before JAX starts, so XLA:CPU applies it. XLA waits the "stuck"
    warning's time (20 s by default; 1 s here, through XLA_FLAGS, which configure keeps), then the
    termination timeout (made 1 s here) before it aborts: a device reaching the all-reduce ~5 s
    after the other then aborts the process with XLA's message naming 1 second. (With the value
    configure sets, 600 s, such a wait is harmless; XLA's own default is 40 s.)"""
    env = _env(XLA_FLAGS="--xla_cpu_collective_call_warn_stuck_timeout_seconds=1")
    res = subprocess.run([sys.executable, "-c", LATE_DEVICE_SCRIPT.format(repo=REPO)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "RESULT" not in res.stdout
    assert "Termination timeout for `all reduce" in res.stderr and "of 1 seconds exceeded" in res.stderr


def _run(module, args, timeout=600):
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_train_and_sample_on_two_cpu_devices_equal_one(tmp_path):
    """The train CLI with --cpu_devices=2 against =1 on the same data (4 steps, batch 16), then
    the sample CLI on the 2-device run with each count.

    Training: per-example noise keys make both runs see the same noise, so only the float32
    summation order of the gradient differs (two partial sums all-reduced): the losses agree to a
    few float32 eps per step; tolerance 1e-4 relative, as in test_train's 8-device check (Adam can
    turn a gradient entry that is zero up to rounding into an O(lr) update, so parameters are not
    compared tightly).
    Sampling: the same parameters, the noise drawn by the partitionable threefry (identical bits
    whatever the split), each example computed whole on one device: only the convolutions' batch
    blocking differs. Over the 20-step chain a float32 rounding difference (~1e-7 relative per
    operation) is amplified at most by the chain's 1/√ᾱ factors (√(1/ᾱ_20) ≈ 3.6 here): tolerance
    1e-4 absolute on data in [0, 1]."""
    idx_dir = write_dir(tmp_path / "idx", make_digits_like(), STD_NAMES, ".gz")
    outs = {}
    for n in (2, 1):
        work = tmp_path / f"run{n}"
        outs[n] = _run("experiments.train", cli_args(idx_dir, work, 4) + [f"--cpu_devices={n}"])
        assert f"devices: {n} x cpu" in outs[n]
    losses = {}
    for n in (1, 2):
        rows = map(json.loads, (tmp_path / f"run{n}" / "metrics.jsonl").read_text().splitlines())
        losses[n] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses[1]) == len(losses[2]) >= 2
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)

    samples = {}
    for n in (2, 1):
        out = tmp_path / f"samples{n}"
        log = _run("experiments.sample", ["--workdir", str(tmp_path / "run2"), "--method", "eps_ddpm", "--num", "8",
                                          "--batch_size", "4", f"--cpu_devices={n}", "--out", str(out)])
        assert f"in batches of 4 on {n} cpu device(s)" in log
        samples[n] = np.load(out / "samples.npz")["samples"]
    assert samples[1].shape == (8, 8, 8, 1)
    np.testing.assert_allclose(samples[2], samples[1], rtol=0, atol=1e-4)


EVAL_SCRIPT = """
import sys, time, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from ddpm_jax import cpu_devices, objectives
from ddpm_jax.models import make_model
from ddpm_jax.train_step import Parallel, StepConfig
from ddpm_jax.train_state import make_optimizer
from ddpm_jax.config import schedule_from_config as build_schedule
from helpers import tiny_config
cpu_devices.configure({n}, [20])
c = tiny_config("eps")
model = make_model("small", image_shape=(28, 28, 1))
params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.ones((1,)))["params"]
loss = objectives.get_objective("eps", weighting="simple", reduction="sum")
par = Parallel(StepConfig(model.apply, loss, make_optimizer(c.optim, steps_per_epoch=1, params=params), 0.999, "index"))
images = np.random.default_rng(0).random((4000, 28, 28, 1), dtype=np.float32)
t0 = time.time()
val = par.evaluate(params, build_schedule(c), images, jax.random.PRNGKey(3), 20)
print("RESULT", jax.device_count(), repr(val), round(time.time() - t0, 1))
"""


def test_evaluate_many_batches_on_two_cpu_devices():
    """Parallel.evaluate over 200 batches of 20 MNIST-sized images on two CPU devices finishes
    and gives one device's mean loss. Without the wait after each batch this run aborted
    here (independent collective programs in flight together deadlock XLA:CPU's thread pool; it
    kills the process after 40 s). The two means sum the same 4,000 per-example losses (each 784
    float32 terms) in a different order: a few float32 eps relative; tolerance 1e-5."""
    vals = {}
    for n in (2, 1):
        script = EVAL_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"), n=n)
        res = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        devices, val, _ = res.stdout.split("RESULT", 1)[1].split()
        assert int(devices) == n
        vals[n] = float(val)
    np.testing.assert_allclose(vals[2], vals[1], rtol=1e-5)


def test_the_dispatch_window_waits_for_the_step_before_the_one_just_dispatched():
    log = []
    window = cpu_devices.DispatchWindow()
    for name in "abcd":
        window.add(FakeArray(name, log))
        assert log == list("abcd"[: "abcd".index(name)])  # all earlier steps finished, not this one
    window.wait()
    window.wait()  # nothing left to wait for
    assert log == list("abcd")
    log.clear()
    off = cpu_devices.DispatchWindow(enabled=False)
    for name in "abc":
        off.add(FakeArray(name, log))
    off.wait()
    assert log == []  # never waited


COLLECTIVES_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ddpm_jax import cpu_devices
assert jax.local_device_count() == 2 and cpu_devices.shared_thread_pool()
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.device_put(jnp.ones((2, 100_000)), NamedSharding(mesh, P("d")))
f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")))
window = cpu_devices.DispatchWindow()
for _ in range(600):
    y = f(x)
    window.add(y)
print("RESULT", float(y.block_until_ready()[0, 0]))
"""


def test_back_to_back_collectives_on_two_cpu_devices_finish_through_the_window(tmp_path):
    """600 jitted psums on 2 CPU devices, dispatched back to back through the window. With XLA's
    default pool of as many threads as devices (NPROC unset, 2 cores), the same loop without the
    window hung (deadlocked in the all-reduce) in 7 of 8 tries on the project's VM, through it in
    none of 10; on a machine with more cores the pool is larger and both finish."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT.format(repo=REPO))
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("RESULT", 1)[1].split() == ["2.0"]
