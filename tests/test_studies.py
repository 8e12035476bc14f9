"""The study scripts (experiments/study_*.py) end to end on tiny 28x28 data: what each writes, the
numbers that must hold whatever the data, and one-line refusals of bad configs."""

import json
import math
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest

sys.path.insert(0, helpers.REPO)
from configs import studies  # noqa: E402


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx28")
    return helpers.write_dir(d, helpers.make_raw(n_train=300, n_test=60, h=28, w=28))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _run(study, config, workdir, idx_dir, *extra, check=True):
    """Runs experiments.study_<study> with a tiny budget: T = 4, batch 16, 3 steps, N = 8 samples."""
    args = [sys.executable, "-m", f"experiments.study_{study}", "--config", f"configs/studies.py:{config}", "--workdir", str(workdir),
            "--config.data.source=idx", f"--config.data.path={idx_dir}", "--config.schedule_num_steps=4",
            "--config.train.batch_size=16", "--config.train.train_size=64", "--config.train.val_size=32",
            "--config.train.num_steps=3", "--config.eval.num_samples=8", "--config.eval.batch_size=8", *extra]
    p = subprocess.run(args, cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_every_study_has_a_full_and_a_cpu_config_and_unknown_names_are_refused():
    for name in studies.STUDIES:
        full, cpu = studies.get_config(name), studies.get_config(name + "_cpu")
        assert full.study == cpu.study == name
        assert full.train.num_epochs == 60 and full.train.train_size == 50_000  # the source's budget
        assert cpu.train.num_epochs * cpu.train.train_size <= full.train.num_epochs * full.train.train_size
    for bad in ("widht", "width_cpu_cpu", "cpu"):
        with pytest.raises(ValueError, match="unknown study config"):
            studies.get_config(bad)


def test_loss_variability_per_pixel_mean_is_the_sum_over_d(tmp_path, idx_dir):
    """Adam's update m̂/(√v̂ + ε) does not change when the loss is divided by d = 784, so the sum and
    the per-pixel-mean runs follow the same parameters (no clipping in this study) and every loss
    of the mean run is the sum run's / d: per-subset losses ×d, variances ×d², CVs equal. What
    separates them is ε = 1e-8 against √v̂ of the /d-scaled gradients and float32 rounding over 12
    steps; 1e-3 relative is far above both and far below any real difference."""
    p = _run("loss_variability", "loss_variability_cpu", tmp_path, idx_dir, "--config.train.train_size=300",
             "--config.num_subsets=3", "--config.subset_size=100", "--config.epochs=2", "--config.held_out=16",
             "--config.train.batch_size=25")
    r = _load(tmp_path / "loss_variability.json")
    d = r["pixels_d"]
    assert d == 784 and r["steps_per_run"] == 8 and os.path.exists(tmp_path / "loss_variability.png")
    s, m = r["losses"]["xprev_sum"], r["losses"]["xprev_mean"]
    np.testing.assert_allclose(np.asarray(s["per_subset_last_epoch_loss"]), d * np.asarray(m["per_subset_last_epoch_loss"]), rtol=1e-3)
    np.testing.assert_allclose(s["across_subset_variance_mean_over_steps"], d ** 2 * m["across_subset_variance_mean_over_steps"], rtol=3e-3)
    assert math.isclose(s["across_subset_cv_mean_over_last_epoch"], m["across_subset_cv_mean_over_last_epoch"], rel_tol=2e-3)
    assert math.isclose(s["held_out_stats"]["cv"], m["held_out_stats"]["cv"], rel_tol=2e-3)
    st = s["per_subset_stats"]
    assert st["min"] <= st["p25"] <= st["median"] <= st["p75"] <= st["max"]
    assert len(r["losses"]["mean_sum"]["curves"]) == 3 and len(r["losses"]["mean_sum"]["curves"][0]) == 8
    assert "per-subset loss" in p.stdout


def test_steps_study_scores_every_setting_and_plots(tmp_path, idx_dir):
    _run("steps", "steps_cpu", tmp_path, idx_dir, "--config.num_steps=2,4", "--config.etas=0", f"--config.runs_dir={tmp_path / 'runs'}")
    r = _load(tmp_path / "steps.json")
    got = [(x["sampler"]["method"], x["num_steps"]) for x in r["results"]]
    assert got == [("ddim", 2), ("ddim", 4), ("eps_ddpm", 4)]
    for x in r["results"]:
        assert x["num_samples"] == 8 and x["fid_pixel_notebook"]["vs_pool"] > 0 and x["fid_classifier"]["test"] > 0
    for name in ("fid_pixel_vs_steps.png", "fid_classifier_vs_steps.png", "grid_ddim_steps2_eta0.png"):
        assert os.path.exists(tmp_path / name)
    # The ε run it trained is an ordinary training run, reused by the next study that asks for it.
    assert os.path.isdir(tmp_path / "runs" / "eps" / "checkpoints" / "3")


def test_methods_study_table_and_trajectory_figure(tmp_path, idx_dir):
    _run("methods", "methods_cpu", tmp_path, idx_dir, "--config.variants=x0", "--config.trajectory_samples=4")
    r = _load(tmp_path / "methods.json")
    methods = r["results"]["x0"]["methods"]
    assert sorted(methods) == ["x0_coherent", "x0_fresh"]
    for rep in methods.values():
        for key in ("nn_mse", "div_real", "mean_gap", "std_gap", "coverage", "entropy"):
            assert key in rep["sample_quality"]
        assert set(rep["trajectory"]) == {"M_eps", "M_dx", "M_x0"}
    assert os.path.exists(tmp_path / "trajectories.png")


def test_width_and_objectives_studies(tmp_path, idx_dir):
    _run("width", "width_cpu", tmp_path / "w", idx_dir, "--config.presets=small,medium")
    w = _load(tmp_path / "w" / "width.json")["presets"]
    assert w["small"]["params"] == 165_865 and w["medium"]["params"] == 1_115_425  # the counts test_models checks against the formula
    assert all(len(w[p]["train_loss_per_epoch"]) == 1 and w[p]["seconds_per_epoch"] > 0 for p in w)  # 3 steps of 4 per epoch
    assert os.path.exists(tmp_path / "w" / "width_loss.png")
    _run("objectives", "objectives_cpu", tmp_path / "o", idx_dir, "--config.variants=mean")
    o = _load(tmp_path / "o" / "objectives.json")["results"]
    assert list(o) == ["mean"] and list(o["mean"]["methods"]) == ["xprev_noise"]
    assert os.path.exists(tmp_path / "o" / "objectives_grids.png")


@pytest.mark.parametrize("study,config,extra,message", [
    ("width", "steps_cpu", (), "this script runs 'width'"),
    ("loss_variability", "loss_variability_cpu", ("--config.losses=xprev_sum,l1",), "unknown ['l1']"),
    ("methods", "methods_cpu", ("--config.variants=eps,v",), "unknown ['v']"),
    ("steps", "steps_cpu", ("--config.run=/nonexistent/run",), "is not a directory"),
    ("loss_variability", "loss_variability_cpu", ("--config.num_subsets=40",), "need 40000 training images"),
])
def test_bad_study_configs_fail_with_one_line(tmp_path, idx_dir, study, config, extra, message):
    p = _run(study, config, tmp_path, idx_dir, *extra, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr and "Traceback" not in p.stderr


def test_training_study_recipes_are_valid_configs_and_bad_input_is_one_line(tmp_path):
    """Every recipe of experiments.study_training is configs/mnist_unet.py with overrides that
    validate; unknown recipes, score steps off the checkpoint grid and widths out of range are
    refused in one line before anything trains."""
    from configs import mnist_unet
    from ddpm_jax.config import validate_config

    for name, overrides in mnist_unet.RECIPES.items():
        c = mnist_unet.get_config()
        for key, value in overrides.items():
            node = c
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            assert last in node, (name, key)  # an override of a key the recipe has
            node[last] = value
        validate_config(c)
    for extra, message in ((["--recipes", "baseline,nope"], "unknown ['nope']"),
                           (["--num_steps", "100", "--score_steps", "50"], "must be a checkpoint step"),
                           (["--posthoc_sigma_rels", "0.5"], "--posthoc_sigma_rels"),
                           (["--data_path", str(tmp_path / "nowhere")], "no such directory")):
        p = subprocess.run([sys.executable, "-m", "experiments.study_training", "--root", str(tmp_path / "runs"),
                            "--out_dir", str(tmp_path / "out"), *extra], cwd=helpers.REPO, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], (extra, p.stderr[-2000:])
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
