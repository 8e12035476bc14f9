"""Study: how variable is the x_{t-1} loss — summed over pixels vs the per-pixel mean, and the
Rao-Blackwellised 'mean' objective (the notebook's Coding I.6).

    python -m experiments.study_loss_variability --config configs/studies.py:loss_variability \
        --workdir runs/study_loss_variability

For each loss in ``losses`` (``<objective>_<reduction>``: 'xprev_sum', 'xprev_mean', 'mean_sum')
and each of ``num_subsets`` disjoint ``subset_size``-image subsets of the training split, a small
U-Net (the same initial weights every time) is trained on that subset alone for ``epochs`` passes
(batch 100, Adam 0.01, the ρ-head at 0.2, no decay and — as in the notebook — no gradient
clipping: a clip at a fixed norm would treat the two scales differently), and its training loss is
recorded at every step. Per loss it reports, over the subsets:

- the per-subset loss (the mean training loss of the last epoch): min / 25 % / median / 75 % / max;
- the across-subset variance of the loss at each step, averaged over the steps (the notebook's
  "average across-subset variance"), and the across-subset coefficient of variation sd / mean;
- the step-to-step variance of the loss within a run (last epoch), averaged over subsets, and its CV;
- the loss of each trained network on one fixed held-out set (``held_out`` validation images, fixed
  t and noise), with the same statistics.

The per-pixel mean is the sum divided by d = H·W·C, so its variances are the sum's / d² while
every CV is the same: the "1/d variance reduction" is a change of units. The 'mean' objective
replaces the sampled x_{t-1} by its conditional expectation, which lowers the CV for real.
Writes ``loss_variability.json`` and ``loss_variability.png``.
"""

import os
import time

import numpy as np
from absl import app

from experiments import cli
from experiments import study_runs as sr

FLAGS = sr.FLAGS
sr.define_flags("loss_variability")

OBJECTIVE_REDUCTIONS = {"xprev_sum": ("xprev", "sum"), "xprev_mean": ("xprev", "mean"), "mean_sum": ("mean", "sum")}


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return {"min": q[0], "p25": q[1], "median": q[2], "p75": q[3], "max": q[4], "mean": v.mean(),
            "var": v.var(ddof=1), "cv": v.std(ddof=1) / abs(v.mean())}


def main(argv):
    del argv
    c, workdir = sr.start("loss_variability")
    losses = sr.csv_choices(c.losses, OBJECTIVE_REDUCTIONS, "losses")
    if c.num_subsets < 2 or c.subset_size < 100 or c.epochs < 1:
        sr.fail("need config.num_subsets >= 2, config.subset_size >= 100 and config.epochs >= 1")
    import jax

    from ddpm_jax import data, objectives
    from ddpm_jax.train_state import create_train_state, make_optimizer
    from ddpm_jax.train_step import Parallel, StepConfig
    from ddpm_jax.config import schedule_from_config
    from ddpm_jax.models import model_from_config

    base = sr.training_config(c, "xprev", optim__decay_every_epochs=0, optim__grad_clip_norm=0.0)
    try:
        splits = data.splits_from_config(base)
    except (ValueError, FileNotFoundError) as e:
        sr.fail(str(e))
    need = c.num_subsets * c.subset_size
    if need > splits.train.shape[0] or splits.val.shape[0] < c.held_out:
        sr.fail(f"{c.num_subsets} subsets of {c.subset_size} need {need} training images (have {splits.train.shape[0]}) "
                f"and {c.held_out} validation images (have {splits.val.shape[0]})")
    order = np.random.default_rng(base.seed).permutation(splits.train.shape[0])[:need].reshape(c.num_subsets, c.subset_size)
    held_out = splits.val[:c.held_out]
    bs = base.train.batch_size
    spe = data.steps_per_epoch(c.subset_size, bs)
    steps = c.epochs * spe
    schedule = schedule_from_config(base)
    model = model_from_config(base.model, splits.image_shape)
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(base.seed), 3)
    train_key = np.asarray(train_key)  # the step donates its state: keep host copies to start every run from
    params0 = jax.device_get(model.init(init_key, np.zeros((1,) + splits.image_shape, np.float32), np.ones((1,)))["params"])
    tx = make_optimizer(base.optim, steps_per_epoch=spe, params=params0)

    results = {}
    for name in losses:
        obj, red = OBJECTIVE_REDUCTIONS[name]
        loss_fn = objectives.get_objective(obj, weighting="elbo", reduction=red)
        par = Parallel(StepConfig(apply_fn=model.apply, loss_fn=loss_fn, tx=tx, ema_decay=0.0, time_input=base.model.time_input))
        curves, held = [], []
        t0 = time.time()
        for s in range(c.num_subsets):
            subset = splits.train[order[s]]
            state = par.put_state(create_train_state(params0, tx, train_key))
            it = data.BatchIterator(subset, bs, seed=base.seed + s)
            per_step = []
            for step in range(steps):
                state, m = par.train(state, schedule, par.put_batch(it.batch(step)))
                per_step.append(m["loss"])
            curves.append(np.asarray(jax.device_get(per_step), np.float64))
            held.append(par.evaluate(state.params, schedule, held_out, eval_key, bs))
        curves = np.stack(curves)  # (subsets, steps)
        last = curves[:, -spe:]
        per_subset = last.mean(axis=1)
        across_var = curves.var(axis=0, ddof=1)
        results[name] = {
            "objective": obj, "reduction": red,
            "per_subset_last_epoch_loss": per_subset.tolist(),
            "per_subset_stats": _stats(per_subset),
            "across_subset_variance_mean_over_steps": float(across_var.mean()),
            "across_subset_variance_mean_over_last_epoch": float(across_var[-spe:].mean()),
            "across_subset_cv_mean_over_last_epoch": float((curves.std(axis=0, ddof=1) / np.abs(curves.mean(axis=0)))[-spe:].mean()),
            "within_run_step_variance_last_epoch": float(last.var(axis=1, ddof=1).mean()),
            "within_run_step_cv_last_epoch": float((last.std(axis=1, ddof=1) / np.abs(last.mean(axis=1))).mean()),
            "held_out_loss": held, "held_out_stats": _stats(held),
            "curves": curves.tolist(), "seconds": time.time() - t0,
        }
        st = results[name]["per_subset_stats"]
        sr.log(f"{name:11s} per-subset loss min {st['min']:.4g} p25 {st['p25']:.4g} median {st['median']:.4g} p75 {st['p75']:.4g} "
               f"max {st['max']:.4g}; across-subset var {results[name]['across_subset_variance_mean_over_steps']:.4g} "
               f"(CV {results[name]['across_subset_cv_mean_over_last_epoch']:.3f}); within-run CV "
               f"{results[name]['within_run_step_cv_last_epoch']:.3f}; held-out CV {results[name]['held_out_stats']['cv']:.4f} "
               f"({time.time() - t0:.0f}s)")
    d_pixels = int(np.prod(splits.image_shape))
    out = {"study": "loss_variability", "num_subsets": c.num_subsets, "subset_size": c.subset_size, "epochs": c.epochs,
           "steps_per_run": steps, "batch_size": bs, "pixels_d": d_pixels, "held_out_images": c.held_out, "losses": results}
    if "xprev_sum" in results and "xprev_mean" in results:
        a, b = results["xprev_sum"], results["xprev_mean"]
        out["sum_over_mean"] = {
            "per_subset_loss_ratio_median": float(np.median(np.asarray(a["per_subset_last_epoch_loss"]) / np.asarray(b["per_subset_last_epoch_loss"]))),
            "across_subset_variance_ratio": a["across_subset_variance_mean_over_steps"] / b["across_subset_variance_mean_over_steps"],
            "d": d_pixels, "d_squared": d_pixels ** 2}
    sr.write_json(workdir, "loss_variability.json", out)
    _figure(results, d_pixels, os.path.join(workdir, "loss_variability.png"))


def _figure(results, d_pixels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    names = list(results)
    scaled = [np.asarray(results[n]["per_subset_last_epoch_loss"]) * (d_pixels if results[n]["reduction"] == "mean" else 1) for n in names]
    axes[0].boxplot(scaled)
    axes[0].set_xticks(np.arange(1, len(names) + 1), [n + (" (×d)" if results[n]["reduction"] == "mean" else "") for n in names])
    axes[0].set(title="per-subset loss, last epoch (per-pixel mean rescaled ×d)", ylabel="loss (summed units)")
    cv = [[results[n]["across_subset_cv_mean_over_last_epoch"], results[n]["within_run_step_cv_last_epoch"],
           results[n]["held_out_stats"]["cv"]] for n in names]
    x = np.arange(len(names))
    for i, label in enumerate(["across subsets (per step)", "step to step (within a run)", "held-out loss across subsets"]):
        axes[1].bar(x + (i - 1) * 0.27, [row[i] for row in cv], width=0.27, label=label)
    axes[1].set_xticks(x, names)
    axes[1].set(title="coefficient of variation (scale-free)", ylabel="sd / mean")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    sr.log(f"figure: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
