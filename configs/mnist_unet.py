"""A starting point for a strong MNIST recipe: the U-Net of Ho et al. (2020) scaled to 28×28×1.

    python -m experiments.train --config configs/mnist_unet.py --workdir runs/mnist_unet \\
        --config.data.source=idx --config.data.path=../shared/data/mnist
    python -m experiments.model_summary --config configs/mnist_unet.py

PROVISIONAL: the widths, rates and budget below are a first guess modelled on configs/cifar10.py,
not measured; they are to be tuned by measurement (quality per training minute on the CPU and per
network evaluation) before any number is reported with them. configs/mnist.py stays the source
notebook's recipe.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # or 'idx' with data.path (../shared/data/mnist)
    c.data.name = "mnist"
    c.data.path = ""
    c.data.scale = "[-1,1]"  # as in the paper: centred data
    c.data.train_size = 50_000  # the notebook's split of the 70,000 pooled images
    c.data.val_size = 20_000
    c.data.random_flip = False  # digits are not mirror-symmetric

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "linear"  # the paper's T = 1000, β 1e-4..0.02
    c.schedule.num_steps = 1000
    c.schedule.beta_start = 1e-4
    c.schedule.beta_end = 0.02

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.ch = 32  # provisional: a quarter of CIFAR-10's width
    c.model.ch_mult = (1, 2, 2)  # three levels: 28, 14, 7 pixels (2² divides 28)
    c.model.num_res_blocks = 1  # provisional
    c.model.attn_resolutions = (14,)  # provisional: attention at the middle level, as 16 of 32 on CIFAR-10
    c.model.dropout = 0.1  # provisional: the paper's CIFAR-10 rate
    c.model.num_groups = 8  # divides 32 and 64
    c.model.time_input = "index"

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "eps"
    c.objective.weighting = "simple"  # L_simple
    c.objective.reduction = "mean"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4  # provisional: the paper's rate
    c.optim.rho_learning_rate = 2e-4  # unused: no ρ-head
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay_factor = 1.0
    c.optim.decay_every_epochs = 0
    c.optim.warmup_steps = 500  # provisional
    c.optim.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # provisional
    c.train.num_epochs = 20  # provisional
    c.train.num_steps = 0
    c.train.ema_decay = 0.999  # provisional: 0.9999 averages over more steps than a short run has
    c.train.parallel = "jit"
    c.train.log_every_steps = 50
    c.train.max_nonfinite_steps = 10
    c.train.eval_every_epochs = 1
    c.train.sample_every_epochs = 5
    c.train.num_grid_samples = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = "eps_ddpm"
    c.sampling.ddpm_variance = "posterior"  # σ_t² = β̃_t: the better one on MNIST (docs/results.md)
    c.sampling.clip_x0 = True  # clip x̂_0 to [-1, 1] each step, as the paper's sampler does

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    return c
