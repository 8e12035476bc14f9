"""Any device count: the default configs' steps on 1, 2, 4 and 8 devices, and a run that moves
between device counts when it resumes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, write_dir

DEFAULTS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    assert jax.device_count() == 8, jax.device_count()
    from configs import mnist, mnist_unet
    from ddpm_jax import sharding
    from ddpm_jax.config import schedule_from_config, validate_config
    from ddpm_jax.trainer import _build_step, _fit_options
    from ddpm_jax.train_state import create_train_state
    from ddpm_jax.train_step import Parallel

    out = {{}}
    for name, config in (("mnist", mnist.get_config()), ("mnist_unet", mnist_unet.get_config())):
        validate_config(config)
        b = config.train.batch_size
        _, params, cfg, _ = _build_step(config, (28, 28, 1), steps_per_epoch=500)
        schedule = schedule_from_config(config)
        images = np.random.default_rng(0).uniform(0, 1, (b, 28, 28, 1)).astype(np.float32)
        state, _ = _fit_options(config, cfg, create_train_state(params, cfg.tx, jax.random.PRNGKey(1)), 0, {{}})
        state = jax.device_get(state)  # with the optional parts the config asks for (importance history)
        for n in (1, 2, 4, 8):
            par = Parallel(cfg, mesh=sharding.make_mesh(jax.devices()[:n]))
            st, m = par.train(par.put_state(state), schedule, par.put_batch(images))
            out[f"{{name}}_{{n}}"] = {{"loss": float(m["loss"]), "padded": par.padded_batch(b), "step": int(st.step)}}
    print("RESULT", json.dumps(out))
    """
)


def test_default_configs_train_on_1_2_4_and_8_devices():
    """configs/mnist.py (batch 100: padded to 104 on 8 devices) and configs/mnist_unet.py (batch
    128) take one step on 1, 2, 4 and 8 virtual CPU devices from the same state and batch. Each
    example's noise and weight do not depend on the split, so the loss is the same sum taken in
    another order: equal to 1e-6 relative (float32 eps 1.2e-7 times a few for the reordering)."""
    res = subprocess.run([sys.executable, "-c", DEFAULTS_SCRIPT.format(repo=REPO)], capture_output=True, text=True,
                         env=cpu_env(8), cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["mnist_8"]["padded"] == 104 and out["mnist_4"]["padded"] == 100 and out["mnist_unet_8"]["padded"] == 128
    for name in ("mnist", "mnist_unet"):
        ref = out[f"{name}_1"]["loss"]
        for n in (2, 4, 8):
            assert out[f"{name}_{n}"]["step"] == 1
            assert out[f"{name}_{n}"]["loss"] == pytest.approx(ref, rel=1e-6), (name, n, out)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("idx"), make_digits_like(), STD_NAMES, ".gz")


def _train(args, devices):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args, f"--cpu_devices={devices}"], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(), timeout=600)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_run_resumes_on_another_device_count(tmp_path, idx_dir):
    """A batch of 12 on 8 devices (padded to 16) for 3 steps, resumed on 1 device for 3 more,
    against 6 steps on 1 device: the log says what changed, and the losses agree to float32
    summation order (1e-5 relative: eps 1.2e-7 times the ~100 terms of a reduction, over a few
    Adam steps)."""
    flags = dict(train__batch_size=12, train__log_every_steps=1, train__sample_every_epochs=0, train__eval_every_epochs=0)
    moved, straight = tmp_path / "moved", tmp_path / "straight"
    first = _train(cli_args(idx_dir, moved, 3, **flags), devices=8)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "global batch 12 padded to 16 (a multiple of 8 devices): 4 zero-weight examples per step" in first.stdout
    second = _train(cli_args(idx_dir, moved, 6, **flags), devices=1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming on 1 devices a run saved on 8" in second.stdout and "done: step 6" in second.stdout
    ref = _train(cli_args(idx_dir, straight, 6, **flags), devices=1)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = _losses(moved), _losses(straight)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in b:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])
