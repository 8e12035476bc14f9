"""Study: the lecture's six-method table — A1 x_{t-1} regression (deterministic / + noise), A2 x_0
prediction (fresh / coherent noise), A3 ε prediction (deterministic / DDPM), each network trained
with its own objective at the same budget and sampled with its two methods.

    python -m experiments.study_methods --config configs/studies.py:methods --workdir runs/study_methods

Trains configs/mnist.py:<variant> for each of ``variants`` (xprev, x0, eps) at the study's budget,
draws ``eval.num_samples`` samples with each method and scores them (``ddpm_jax.evaluation``:
pixel and classifier FIDs with floors, NN-MSE, divMSE, div/real, meanGap, stdGap, coverage,
entropy), plus the trajectory metrics M_ε, M_Δx, M_x̂0 over ``trajectory_samples`` trajectories.
Writes ``methods.json``, a grid per method and ``trajectories.png`` (x_t at t = T, 3T/4, T/2, T/4, 0
for each method). :func:`run_study` also serves ``experiments.study_objectives``.
"""

import os
from typing import Dict, List

import numpy as np
from absl import app

from experiments import cli
from experiments import study_runs as sr

FLAGS = sr.FLAGS

#: The lecture's rows: variant (configs/mnist.py:<variant>) -> (label, its two samplers).
METHODS: Dict[str, List[str]] = {"xprev": ["xprev_det", "xprev_noise"], "x0": ["x0_fresh", "x0_coherent"], "eps": ["eps_det", "eps_ddpm"]}
LABELS = {"xprev_det": "A1 x_{t-1} deterministic", "xprev_noise": "A1 x_{t-1} + noise", "x0_fresh": "A2 x_0 fresh noise",
          "x0_coherent": "A2 x_0 coherent noise", "eps_det": "A3 ε deterministic", "eps_ddpm": "A3 ε DDPM"}
SNAPSHOTS = 8  # trajectories shown per method in the figure


def run_study(c, workdir: str, study: str, methods: Dict[str, List[str]]) -> dict:
    """Trains each variant of ``methods`` (variant -> samplers) and scores every sampler;
    writes ``<study>.json``, grids, and (if ``c.trajectory_samples``) ``trajectories.png``."""
    from ddpm_jax import data, plots
    from ddpm_jax.config import ConfigError
    from ddpm_jax.runs import load_run

    try:
        configs = {v: sr.training_config(c, v) for v in methods}
    except (ConfigError, ValueError) as e:
        sr.fail(str(e))
    results, snapshots = {}, {}
    for variant, config in configs.items():
        run_dir = os.path.join(sr.runs_dir(c, workdir), variant)
        summary = sr.train(config, run_dir)
        run = load_run(run_dir)
        splits = sr.load_splits(run, c)
        T = run.schedule.num_steps
        results[variant] = {"workdir": run_dir, "step": run.step, "final_val_loss": summary["val_loss"],
                            "final_val_loss_ema": summary["val_loss_ema"], "objective": dict(config.objective), "methods": {}}
        for method in methods[variant]:
            opts = run.sampler_options(method)
            report, _, traj = sr.score(run, splits, opts, c.eval, grid_path=os.path.join(workdir, f"grid_{variant}_{method}.png"),
                                       trajectory_samples=c.trajectory_samples)
            results[variant]["methods"][method] = report
            sr.log(f"{variant:6s} {method:12s} {sr.headline(report)}")
            if traj is not None:
                idx = [T - t for t in (T, 3 * T // 4, T // 2, T // 4, 0)]  # traj['x'][i] is x at t = T - i
                snapshots[LABELS.get(method, method)] = np.stack(
                    [np.asarray(data.unscale_images(traj["x"][i][:SNAPSHOTS], run.data_scale)) for i in idx])
    out = {"study": study, "budget": dict(c.train), "num_samples": c.eval.num_samples, "results": results}
    sr.write_json(workdir, f"{study}.json", out)
    if snapshots:
        T = c.schedule_num_steps
        path = plots.save_snapshot_table(snapshots, [f"t = {t}" for t in (T, 3 * T // 4, T // 2, T // 4, 0)],
                                         os.path.join(workdir, "trajectories.png"), title="x_t along each sampler's trajectory")
        sr.log(f"figure: {path}")
    return out


def main(argv):
    del argv
    c, workdir = sr.start("methods")
    variants = sr.csv_choices(c.variants, METHODS, "variants")
    run_study(c, workdir, "methods", {v: METHODS[v] for v in variants})


if __name__ == "__main__":
    sr.define_flags("methods")
    app.run(main, flags_parser=cli.parse_flags)
