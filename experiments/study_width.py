"""Study: network width — the small / medium / large U-Nets on the same ε recipe (Coding I.7).

    python -m experiments.study_width --config configs/studies.py:width --workdir runs/study_width

Trains configs/mnist.py (ε objective) at the study's budget once per preset in ``presets``
(medium and large with ``model.conv_impl='stride1'``: the same numbers, faster on CPU; one
16-sample grid at the end instead of one per epoch), then
reads each run's metrics.jsonl. Reports per preset the parameter count, seconds per epoch (the
training set over the median training throughput, so validation and sampling are not counted),
and the train and validation loss at every epoch. Writes ``width.json`` and ``width_loss.png``.
"""

import os

import numpy as np
from absl import app

from experiments import cli
from experiments import study_runs as sr

FLAGS = sr.FLAGS
sr.define_flags("width")


def main(argv):
    del argv
    c, workdir = sr.start("width")
    from ddpm_jax.models import PRESETS, count_params

    presets = sr.csv_choices(c.presets, PRESETS, "presets")
    from ddpm_jax import data, plots
    from ddpm_jax.config import ConfigError
    from ddpm_jax.runs import load_run
    from ddpm_jax.writers import read_metrics

    try:
        # A sample grid only at the end, and a small one: 64 samples × T steps of the large network is minutes on a CPU.
        configs = {p: sr.training_config(c, "eps", model__preset=p, model__conv_impl="xla" if p == "small" else "stride1",
                                         train__sample_every_epochs=0, train__num_grid_samples=16) for p in presets}
    except (ConfigError, ValueError) as e:
        sr.fail(str(e))
    results = {}
    for preset, config in configs.items():
        run_dir = os.path.join(sr.runs_dir(c, workdir), f"eps_{preset}")
        summary = sr.train(config, run_dir)
        rows = read_metrics(run_dir)
        spe = data.steps_per_epoch(config.data.train_size, config.train.batch_size)
        n_epochs = -(-summary["step"] // spe)
        train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        val = [(r["step"] / spe, r["val/loss"], r["val/loss_ema"]) for r in rows if "val/loss" in r]
        ips = float(np.median([r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r]))
        total, _ = count_params(load_run(run_dir).params)
        epoch_train = [float(np.mean([v for s, v in train if (e - 1) * spe < s <= e * spe] or [np.nan])) for e in range(1, n_epochs + 1)]
        results[preset] = {"params": total, "channels": list(PRESETS[preset]), "images_per_sec_median": ips,
                           "seconds_per_epoch": config.data.train_size / ips, "steps": summary["step"],
                           "train_loss_per_epoch": epoch_train, "train_loss_steps": train,
                           "val_loss": [v for _, v, _ in val], "val_loss_ema": [v for _, _, v in val],
                           "val_epochs": [e for e, _, _ in val], "final_val_loss": summary["val_loss"],
                           "final_val_loss_ema": summary["val_loss_ema"], "workdir": run_dir, "wall_seconds": summary["seconds"]}
        sr.log(f"{preset:7s} params {total:>10,}  {results[preset]['seconds_per_epoch']:7.1f} s/epoch  "
               f"final val loss {summary['val_loss']:.3f} (EMA {summary['val_loss_ema']:.3f})")
    b = c.train
    out = {"study": "width", "budget": dict(b), "presets": results}
    sr.write_json(workdir, "width.json", out)
    series = {}
    for preset, r in results.items():
        epochs = np.arange(1, len(r["train_loss_per_epoch"]) + 1)
        series[f"{preset} train"] = (epochs, r["train_loss_per_epoch"])
        series[f"{preset} val"] = (r["val_epochs"], r["val_loss"])
    path = plots.save_line_plot(series, os.path.join(workdir, "width_loss.png"), xlabel="epoch", ylabel="ε loss (summed over pixels)",
                                title=f"width: {b.num_epochs} epochs on {b.train_size:,} images", logy=True)
    sr.log(f"figure: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
