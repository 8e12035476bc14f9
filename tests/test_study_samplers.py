"""The fast samplers through the entry points: ``experiments.sample --method dpm_solver_pp`` /
``heun`` and ``experiments.study_samplers`` (quality against network evaluations) on a tiny run."""

import json
import os

import numpy as np

from helpers import STD_NAMES, cli_args, make_digits_like, run_module, write_dir


def test_fast_samplers_from_the_command_line(tmp_path):
    idx_dir = write_dir(tmp_path / "idx", make_digits_like(), STD_NAMES, ".gz")
    work = tmp_path / "run"
    train = run_module("experiments.train", *cli_args(idx_dir, work, 3))
    assert train.returncode == 0, train.stderr[-3000:]

    # experiments.sample with each new method; the output directory names the settings
    for args, tag in ((("--method", "dpm_solver_pp", "--num_steps", 4), "dpm_solver_pp_steps4"),
                      (("--method", "heun", "--num_steps", 3, "--s_churn", 1.0), "heun_steps3_churn1"),
                      (("--method", "heun", "--num_steps", 3, "--grid", "uniform_t"), "heun_steps3_uniform_t")):
        sample = run_module("experiments.sample", "--workdir", work, "--num", 4, "--batch_size", 4, *args)
        assert sample.returncode == 0, sample.stderr[-3000:]
        x = np.load(work / "samples" / tag / "samples.npz")["samples"]
        assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(x))

    # a churn setting on a method without churn: one line, exit 2, nothing sampled
    bad = run_module("experiments.sample", "--workdir", work, "--num", 4, "--method", "dpm_solver_pp", "--num_steps", 4,
               "--s_churn", 1.0)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "settings of method 'heun'" in bad.stderr

    # the study: every method at every budget, NFE recorded as spent (Heun: 2S − 1 ≤ budget)
    out_dir = tmp_path / "eval"
    study = run_module("experiments.study_samplers", "--workdir", work, "--num", 8, "--batch_size", 8, "--nfe", "3,4",
                 "--methods", "ancestral,ddim,dpm_solver_pp,heun:uniform_t", "--out_dir", out_dir)
    assert study.returncode == 0, study.stderr[-3000:]
    path = out_dir / "samplers_n8.json"
    out = json.load(open(path))
    got = [(r["name"], r["nfe"], r["sampler"]["method"], r["sampler"]["num_steps"], r["sampler"].get("grid")) for r in out["rows"]]
    assert got == [("ancestral", 3, "ddim", 3, None), ("ancestral", 4, "ddim", 4, None), ("ddim", 3, "ddim", 3, None),
                   ("ddim", 4, "ddim", 4, None), ("dpm_solver_pp", 3, "dpm_solver_pp", 3, None),
                   ("dpm_solver_pp", 4, "dpm_solver_pp", 4, None),
                   ("heun:uniform_t", 3, "heun", 2, "uniform_t")]  # budgets 3 and 4 both give S = 2, drawn once
    assert [r["sampler"]["eta"] for r in out["rows"][:4]] == [1.0, 1.0, 0.0, 0.0]
    for r in out["rows"]:
        assert r["report"]["num_samples"] == 8 and r["report"]["fid_pixel"]["test"] > 0
        assert r["sample_seconds"] > 0 and r["compile_seconds"] > 0
    for kind in ("nfe", "seconds"):
        assert os.path.getsize(out_dir / f"fid_vs_{kind}_n8.png") > 0

    # a rerun keeps the rows it finds and samples only what is new
    again = run_module("experiments.study_samplers", "--workdir", work, "--num", 8, "--batch_size", 8, "--nfe", "3",
                 "--methods", "ddim,heun", "--out_dir", out_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.load(open(path))["rows"]
    assert rows[:7] == out["rows"] and [(r["name"], r["nfe"]) for r in rows[7:]] == [("heun", 3)]

    # bad flags: one line each, exit 2, the JSON untouched
    for args, fragment in ((("--methods", "euler"), "unknown method 'euler'"),
                           (("--methods", "heun:log"), "unknown grid 'log'"),
                           (("--nfe", "0,5"), "budgets must be integers >= 1")):
        bad = run_module("experiments.study_samplers", "--workdir", work, "--num", 8, "--out_dir", out_dir, *args)
        assert bad.returncode == 2 and fragment in bad.stderr, (args, bad.stderr[-2000:])
    assert json.load(open(path))["rows"] == rows
