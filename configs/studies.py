"""Configs of the source's studies (docs/results.md, "Studies"), one per study, at two budgets.

    python -m experiments.study_loss_variability --config configs/studies.py:loss_variability --workdir runs/study_loss_variability
    python -m experiments.study_width            --config configs/studies.py:width            --workdir runs/study_width
    python -m experiments.study_objectives       --config configs/studies.py:objectives       --workdir runs/study_objectives
    python -m experiments.study_methods          --config configs/studies.py:methods          --workdir runs/study_methods
    python -m experiments.study_steps            --config configs/studies.py:steps            --workdir runs/study_steps

``:<study>`` is the source's budget (60 epochs on the 50,000-image split, like configs/mnist.py);
``:<study>_cpu`` is the smaller budget the results page was run at on a 2-core CPU. Offline data:
``--config.data.source=idx --config.data.path=DIR`` (a directory of the MNIST IDX files); any key can be overridden.

Keys every study has: ``data.{source,path}`` (given to every run it trains), ``seed``;
``train.{num_epochs,num_steps,batch_size,train_size,val_size,decay_every_epochs}``: the training
budget, applied on top of configs/mnist.py for each run (num_steps > 0 overrides num_epochs);
``schedule_num_steps``: T; ``eval.{num_samples,batch_size,seed}``: how samples are
scored (FIDs and the lecture's table, ``ddpm_jax.evaluation``); ``runs_dir``: where the study's
training runs live ('' = <workdir>/runs) — point two studies at one directory to share a run
(an existing finished run there is reused, a partial one resumed).
"""

import ml_collections

STUDIES = ("loss_variability", "width", "objectives", "methods", "steps")


def _budget(c, *, num_epochs, train_size, val_size, decay_every_epochs):
    c.train = ml_collections.ConfigDict(dict(num_epochs=num_epochs, num_steps=0, batch_size=100, train_size=train_size,
                                             val_size=val_size, decay_every_epochs=decay_every_epochs))


def get_config(name: str = "") -> ml_collections.ConfigDict:
    study, _, budget = (name or "").partition("_cpu")
    if study not in STUDIES or budget:
        valid = ", ".join(f"{s}, {s}_cpu" for s in STUDIES)
        raise ValueError(f"unknown study config {name!r}; valid: {valid}")
    cpu = name.endswith("_cpu")
    c = ml_collections.ConfigDict()
    c.study = study
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(source="tfds", path=""))
    c.runs_dir = ""
    c.schedule_num_steps = 200  # T of every run (configs/mnist.py's)
    c.eval = ml_collections.ConfigDict(dict(num_samples=1000, batch_size=500, seed=0))
    # The source's budget: configs/mnist.py's 60 epochs (×0.1 every 20) on 50,000 images.
    _budget(c, num_epochs=60, train_size=50_000, val_size=20_000, decay_every_epochs=20)

    if study == "loss_variability":
        # Coding I.6: one fresh small U-Net per disjoint subset and loss, trained on that subset alone.
        c.num_subsets = 20
        c.subset_size = 1000
        c.losses = "xprev_sum,xprev_mean,mean_sum"  # <objective>_<reduction over pixels>
        c.epochs = 10 if not cpu else 5  # passes over each 1,000-image subset (batch 100: 10 steps each)
        c.held_out = 1000  # validation images every trained network is scored on
    elif study == "width":
        c.presets = "small,medium,large"
        if cpu:  # 10,000 images, 4 epochs (400 steps) each at a constant rate
            _budget(c, num_epochs=4, train_size=10_000, val_size=1_000, decay_every_epochs=0)
    elif study in ("objectives", "methods"):
        # objectives (Coding II.3): the mean objective with the ρ-head vs ε, scored with each one's sampler.
        # methods (the lecture's table): A1 x_{t-1} regression, A2 x_0, A3 ε — each its own objective and two samplers.
        c.variants = "mean,eps" if study == "objectives" else "xprev,x0,eps"
        c.trajectory_samples = 64 if study == "methods" else 0
        if cpu:  # 20 epochs on the 50,000 images (10,000 steps), the rate ×0.1 after epoch 15. At 8 epochs
            # the ε network had not yet learned the image mean (docs/results.md) and its samples saturate.
            _budget(c, num_epochs=20, train_size=50_000, val_size=20_000, decay_every_epochs=15)
    elif study == "steps":
        c.run = ""  # an existing ε run to sample from ('' = train configs/mnist.py at this budget in runs_dir/eps)
        c.num_steps = "10,20,50,100,200"
        c.etas = "0,1"
    return c
