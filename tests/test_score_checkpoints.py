"""The config's default sampler (``sampling.num_steps`` / ``eta``) and
``experiments.score_checkpoints`` (sample quality of every kept checkpoint against training time)."""

import json
import os

import pytest

from ddpm_jax.config import ConfigError, validate_config
from helpers import STD_NAMES, cli_args, make_digits_like, run_module, tiny_config, write_dir


@pytest.mark.parametrize("key, value, fragment", [
    ("sampling.num_steps", 21, "num_steps must be an integer in 1..T = 1..20"),
    ("sampling.num_steps", -1, "num_steps must be an integer in 1..T"),
    ("sampling.eta", 1.5, "eta must be in [0, 1]"),
])
def test_bad_default_sampler_names_the_key(key, value, fragment):
    config = tiny_config("eps", **{"sampling.method": "ddim", key: value})
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value).startswith("config.sampling:") and fragment in str(e.value) and "\n" not in str(e.value)


def test_default_steps_need_ddim():
    with pytest.raises(ConfigError, match="needs one of"):
        validate_config(tiny_config("eps", **{"sampling.num_steps": 5}))  # configs/mnist.py's eps_ddpm
    validate_config(tiny_config("eps", **{"sampling.num_steps": 0}))  # 0: every step, any method


def test_score_checkpoints_scores_each_kept_step_against_training_time(tmp_path):
    idx_dir = write_dir(tmp_path / "idx", make_digits_like(), STD_NAMES, ".gz")
    work = tmp_path / "run"
    args = cli_args(idx_dir, work, 6, sampling__method="ddim", sampling__num_steps=5)
    train = run_module("experiments.train", *args)
    assert train.returncode == 0, train.stderr[-3000:]

    # experiments.sample takes the config's DDIM steps when no flag is given
    sample = run_module("experiments.sample", "--workdir", work, "--num", 4, "--batch_size", 4)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert os.path.exists(work / "samples" / "ddim_steps5_eta0" / "samples.npz")

    score = run_module("experiments.score_checkpoints", "--workdir", work, "--num", 8, "--batch_size", 8)
    assert score.returncode == 0, score.stderr[-3000:]
    path = work / "eval" / "checkpoints_ddim_steps5_eta0_n8.json"
    out = json.load(open(path))
    assert out["sampler"]["num_steps"] == 5 and out["num_samples"] == 8
    rows = out["rows"]
    assert [r["step"] for r in rows] == [3, 6]
    assert 0 < rows[0]["wall_minutes"] < rows[1]["wall_minutes"]  # from the checkpoints' wall_seconds
    assert [r["epoch"] for r in rows] == [1.0, 2.0]  # 48 images, batch 16: 3 steps an epoch
    for r in rows:
        fid = r["report"]["fid_pixel"]
        assert fid["test"] > 0 and fid["floor_train_vs_test"] >= 0 and r["report"]["num_samples"] == 8
    assert os.path.getsize(work / "eval" / "fid_vs_minutes_ddim_steps5_eta0_n8.png") > 0

    # a rerun with the same settings keeps the rows it finds and does not sample their steps again
    again = run_module("experiments.score_checkpoints", "--workdir", work, "--num", 8, "--batch_size", 8, "--steps", 6)
    assert again.returncode == 0 and "reusing 6" in again.stdout, again.stderr[-3000:]
    assert json.load(open(path))["rows"] == rows

    # a step that is not kept: one line, exit 2, the JSON untouched
    missing = run_module("experiments.score_checkpoints", "--workdir", work, "--num", 8, "--steps", "4")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: --steps: {work / 'checkpoints'} has no checkpoint of step 4 (it has: 3, 6)"]
    assert json.load(open(path))["rows"] == rows

    # an --out_dir whose file of the same name holds another run's scores: refused, left as it was
    other = tmp_path / "other"
    other.mkdir()
    foreign = dict(out, workdir="/elsewhere/run")
    (other / path.name).write_text(json.dumps(foreign))
    clash = run_module("experiments.score_checkpoints", "--workdir", work, "--num", 8, "--out_dir", other)
    assert clash.returncode == 2 and "holds scores of other settings (run /elsewhere/run)" in clash.stderr
    assert json.loads((other / path.name).read_text()) == foreign
