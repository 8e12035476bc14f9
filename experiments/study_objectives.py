"""Study: the posterior-mean objective with the ρ-head (Coding I) vs ε prediction (Coding II) at
the same budget (the notebook's Coding II.3).

    python -m experiments.study_objectives --config configs/studies.py:objectives --workdir runs/study_objectives

Trains configs/mnist.py:mean and configs/mnist.py:eps at the study's budget, samples each with its
own sampler (the notebook's: x_{t-1} + noise for the mean model, DDPM for ε), scores both
(pixel and classifier FIDs with their floors, the lecture's table) and writes ``objectives.json``,
``grid_<variant>_<method>.png`` and ``objectives_grids.png`` (the two side by side).
"""

import os

from absl import app

from experiments import cli
from experiments import study_methods
from experiments import study_runs as sr

FLAGS = sr.FLAGS
sr.define_flags("objectives")

SAMPLERS = {"mean": ["xprev_noise"], "eps": ["eps_ddpm"]}


def main(argv):
    del argv
    c, workdir = sr.start("objectives")
    variants = sr.csv_choices(c.variants, SAMPLERS, "variants")
    out = study_methods.run_study(c, workdir, "objectives", {v: SAMPLERS[v] for v in variants})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 4.4), dpi=120, squeeze=False)
    for ax, v in zip(axes[0], variants):
        method = SAMPLERS[v][0]
        ax.imshow(plt.imread(os.path.join(workdir, f"grid_{v}_{method}.png")))
        r = out["results"][v]["methods"][method]
        ax.set_title(f"{v} objective, {method}\npixel FID {r['fid_pixel_notebook']['vs_pool']:.2f}, "
                     f"classifier FID {r['fid_classifier']['test']:.1f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(workdir, "objectives_grids.png")
    fig.savefig(path)
    plt.close(fig)
    sr.log(f"figure: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
