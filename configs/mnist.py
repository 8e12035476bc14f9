"""The source notebook's MNIST recipe as an ml_collections config.

    python -m experiments.train --config configs/mnist.py            # ε objective (Coding II)
    python -m experiments.train --config configs/mnist.py:mean       # posterior-mean + ρ-head (Coding I)
    python -m experiments.train --config configs/mnist.py:xprev      # direct x_{t-1} regression + ρ-head
    python -m experiments.train --config configs/mnist.py:x0         # x_0 prediction
    python -m experiments.train --config configs/mnist.py:v          # v prediction

Any key can be overridden on the command line: ``--config.train.batch_size=128``.

The default is the notebook's ε recipe as its code actually runs: small U-Net, T = 200, linear β
1e-4..0.1, Adam 0.01 with ×0.1 every 20 epochs, batch 100, 60 epochs, and the ε loss with the
*unweighted* ('simple') weighting summed over pixels — the notebook's ELBO weight broadcasts to
the batch mean (docs/source_material.md), so in effect it trains L_simple. The ELBO
weighting is ``--config.objective.weighting=elbo``. One addition: gradients are clipped to global
norm 1 (``optim.grad_clip_norm``; 0 turns it off), see the note at that key; and the DDPM sampler
draws with σ_t² = β̃_t, not the notebook's β_t (``sampling.ddpm_variance``; better FIDs here).
"""

import ml_collections

VARIANTS = ("eps", "mean", "xprev", "x0", "v")


def get_config(variant: str = "eps") -> ml_collections.ConfigDict:
    variant = variant or "eps"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; valid variants: {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # IDX files: data.path if given, else the per-user cache (downloaded once); see ddpm_jax.data.sources
    c.data.name = "mnist"  # mnist, fashion_mnist (downloaded as IDX files), or any TFDS name (cifar10, ...)
    c.data.path = ""  # a directory of IDX files (or of images for source=folder; TFDS data_dir for TFDS)
    c.data.url = ""  # a mirror of the IDX files to download from ('' : the published ones)
    c.data.scale = "[0,1]"  # '[0,1]' (the notebook) | '[-1,1]'
    c.data.train_size = 50_000  # the notebook pools all 70,000 MNIST images, then splits 50k/20k
    c.data.val_size = 20_000
    c.data.random_flip = False  # random horizontal flips of training images (digits are not symmetric)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "linear"
    c.schedule.num_steps = 200
    c.schedule.beta_start = 1e-4
    c.schedule.beta_end = 0.1

    c.model = ml_collections.ConfigDict()
    c.model.name = "scorenet"  # the source U-Net | 'unet': Ho et al.'s (configs/mnist_unet.py, configs/cifar10.py)
    c.model.preset = "small"  # small [8,16,32,64] | medium [32,64,128,256] | large [64,128,256,512]
    c.model.embed_dim = 256
    c.model.num_groups = 4
    c.model.fourier_scale = 30.0
    c.model.rho_head = variant in ("mean", "xprev")  # μ = ρ0 (x_t − ρ1 δ), the notebook's Coding I head
    c.model.time_input = "index"  # 'index': the network sees t (the notebook) | 'fraction': t / T
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (GPU/TPU; params and optimiser state stay float32)
    c.model.num_classes = 0  # K > 0: class-conditional (labels 0..K-1; ddpm_jax/guidance.py) | 0: unconditional
    # How the strided, transposed and output convolutions are computed; same parameters and numbers
    # either way (ddpm_jax/models/scorenet.py CONV_IMPLS). 'auto': the platform profile's ('phases' on
    # CPU, the fastest there: docs/performance.md; 'xla', stock layers, on GPU/TPU) | 'phases' |
    # 'stride1': stride-1 convolutions only | 'xla': as written.
    c.model.conv_impl = "auto"

    c.objective = ml_collections.ConfigDict()
    c.objective.name = variant
    c.objective.weighting = "elbo" if variant in ("mean", "xprev") else "simple"
    c.objective.reduction = "sum"  # 'sum' | 'mean' over pixels

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.01
    c.optim.rho_learning_rate = 0.2  # the ρ-head's own rate (the notebook's Coding I)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay_factor = 0.1  # step decay: ×decay_factor ...
    c.optim.decay_every_epochs = 20  # ... every this many epochs (0: constant rate)
    c.optim.warmup_steps = 0  # linear warm-up from 0 (0: none)
    # Global-norm clipping at 1 (0: none), as in Ho et al. (2020). The notebook does not clip; without
    # it our runs learned a network blind to the image mean (its ε̂ ignores a constant shift of x_t), so
    # the reverse chain amplifies the mean by 1/√ᾱ_T ≈ 180 and most samples saturate. See docs/results.md.
    c.optim.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 100  # global batch, split over all devices (and hosts), padded to a multiple of them
    c.train.grad_accum_steps = 1  # k > 1: each batch as k micro-batches, gradients summed (the same update, 1/k the activations)
    c.train.label_dropout = 0.0  # class-conditional: probability of training on "no class" instead of the label
    c.train.num_epochs = 60
    c.train.num_steps = 0  # > 0: train this many steps, overriding num_epochs
    c.train.ema_decay = 0.999  # EMA of the params (used for samples); warmed up as min(d, (1+s)/(10+s))
    c.train.parallel = "jit"  # 'jit': batch sharded over a 1-D device mesh | 'pmap'
    c.train.log_every_steps = 50
    c.train.max_nonfinite_steps = 10  # stop after this many steps in a row with a NaN/Inf loss or gradient (each skipped)
    c.train.eval_every_epochs = 1  # validation loss (0: never)
    c.train.sample_every_epochs = 1  # sample grid PNG from the EMA params (0: only at the end)
    c.train.num_grid_samples = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = {"eps": "eps_ddpm", "mean": "xprev_noise", "xprev": "xprev_noise", "x0": "x0_coherent", "v": "eps_ddpm"}[variant]
    # σ_t² for eps_ddpm: 'posterior' = β̃_t | 'beta' = β_t (the notebook's). Ho et al. (2020) found the two
    # about equal on CIFAR-10; on this MNIST recipe β̃_t is better on every metric (docs/results.md).
    c.sampling.ddpm_variance = "posterior"
    c.sampling.num_steps = 0  # DDIM only: its number of steps (0: every one of the T)
    c.sampling.eta = 0.0  # DDIM only: its η
    c.sampling.clip_x0 = False  # clip x̂_0 to the data range at every step (the notebook does not)
    c.sampling.guidance = 0.0  # class-conditional: classifier-free guidance w, (1 + w) f(x, t, c) - w f(x, t, no class)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # also saved at the end and on Ctrl-C / SIGTERM
    c.checkpoint.keep = 3
    return c
