"""Study: sample quality against the number of sampling steps (DDIM, eta 0 and 1) for an ε model.

    python -m experiments.study_steps --config configs/studies.py:steps --workdir runs/study_steps \
        [--config.run=runs/mnist]

Samples ``eval.num_samples`` images from the ε run (``run``; '' trains configs/mnist.py at the
study's budget in ``runs_dir/eps``) with ``'ddim'`` at each ``num_steps`` × ``etas``, plus the
full ancestral sampler (``'eps_ddpm'``, T steps) for reference, and scores each set
(``ddpm_jax.evaluation``). Writes ``steps.json`` and ``fid_vs_steps.png`` (pixel FID in the
notebook's protocol, and classifier FID vs the test split, against the number of steps).
"""

import os

from absl import app

from experiments import cli
from experiments import study_runs as sr

FLAGS = sr.FLAGS
sr.define_flags("steps")


def main(argv):
    del argv
    c, workdir = sr.start("steps")
    steps, etas = sr.csv_list(c.num_steps, int), sr.csv_list(c.etas, float)
    from ddpm_jax.runs import load_run, sampling_tag

    if c.run:
        if not os.path.isdir(c.run):
            sr.fail(f"config.run={c.run} is not a directory (give a finished ε run, or '' to train one)")
        run = load_run(c.run)
    else:
        run_dir = os.path.join(sr.runs_dir(c, workdir), "eps")
        sr.train(sr.training_config(c, "eps"), run_dir)
        run = load_run(run_dir)
    if run.parameterisation != "eps":
        sr.fail(f"{run.workdir} is a {run.parameterisation!r} run; this study samples an ε model")
    try:
        settings = [run.sampler_options("ddim", num_steps=s, eta=e) for e in etas for s in steps]
        settings.append(run.sampler_options("eps_ddpm"))
    except ValueError as e:
        sr.fail(str(e))
    splits = sr.load_splits(run, c if not c.run else None)

    results = []
    for opts in settings:
        tag = sampling_tag(opts)
        report, _, _ = sr.score(run, splits, opts, c.eval, grid_path=os.path.join(workdir, f"grid_{tag}.png"))
        report["num_steps"] = opts["num_steps"] or run.schedule.num_steps
        results.append(report)
        sr.log(f"{tag:24s} {report['images_per_sec']:6.1f} img/s  {sr.headline(report)}")
    out = {"study": "steps", "run": run.workdir, "step": run.step, "num_samples": c.eval.num_samples, "results": results}
    sr.write_json(workdir, "steps.json", out)

    figures(out, workdir)
    sr.log(f"figures: {workdir}/fid_pixel_vs_steps.png, fid_classifier_vs_steps.png")


def figures(out: dict, workdir: str) -> None:
    """fid_pixel_vs_steps.png and fid_classifier_vs_steps.png from ``steps.json``'s content."""
    from ddpm_jax import plots

    results = out["results"]
    etas = sorted({r["sampler"]["eta"] for r in results if r["sampler"]["method"] == "ddim"})

    def curve(metric, eta):
        pts = [(r["num_steps"], metric(r)) for r in results if r["sampler"]["method"] == "ddim" and r["sampler"]["eta"] == eta]
        return tuple(zip(*pts))

    ancestral = results[-1]
    variance = "β̃" if ancestral["sampler"].get("ddpm_variance") == "posterior" else "β"
    for name, metric, floor in (
            ("pixel", lambda r: r["fid_pixel_notebook"]["vs_pool"], ancestral["fid_pixel_notebook"]["floor_pool_vs_pool"]),
            ("classifier", lambda r: r["fid_classifier"]["test"], ancestral["fid_classifier"]["floor_train_vs_test"])):
        plots.save_line_plot({f"DDIM eta={e:g}": curve(metric, e) for e in etas}, os.path.join(workdir, f"fid_{name}_vs_steps.png"),
                             xlabel="sampling steps", ylabel=f"{name} FID (N={out['num_samples']})", logx=True,
                             title=f"{name} FID vs steps ({os.path.basename(out['run'])}, step {out['step']})",
                             hlines={f"ancestral eps_ddpm (σ²={variance}), {ancestral['num_steps']} steps": metric(ancestral),
                                     "real vs real": floor})


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
