"""The CIFAR-10 setup of Ho et al. (2020), "Denoising Diffusion Probabilistic Models".

    python -m experiments.train --config configs/cifar10.py --workdir runs/cifar10
    python -m experiments.model_summary --config configs/cifar10.py    # 35,746,307 parameters

The paper's U-Net (``model.name='unet'``, ``ddpm_jax/models/ddpm_unet.py``) trained with the ε
objective and L_simple, as in its Appendix B and its TensorFlow implementation; each value below
says where it comes from. Sized for accelerators: 800k steps of batch 128 (the paper: 10.6 h on a
TPU v3-8).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.path = ""  # optional TFDS data_dir
    c.data.scale = "[-1,1]"  # "integers in {0, ..., 255} scaled linearly to [−1, 1]"
    # The official 50,000 train + 10,000 test images are pooled, shuffled with `seed` and split
    # (ddpm_jax/data.py load_splits): the training set is a random 50,000 of the 60,000 and the
    # validation set the other 10,000, so it is not the paper's training set exactly.
    c.data.train_size = 50_000
    c.data.val_size = 10_000
    c.data.random_flip = True  # "we used random horizontal flips during training" (CIFAR-10)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "linear"  # "β_1 = 1e-4 to β_T = 0.02", linear
    c.schedule.num_steps = 1000  # T = 1000
    c.schedule.beta_start = 1e-4
    c.schedule.beta_end = 0.02

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"  # the paper's U-Net (PixelCNN++ backbone with GroupNorm and attention)
    c.model.ch = 128  # base width; time embedding 4·128 = 512
    c.model.ch_mult = (1, 2, 2, 2)  # four levels: 32, 16, 8, 4 pixels
    c.model.num_res_blocks = 2  # "two convolutional residual blocks per resolution level"
    c.model.attn_resolutions = (16,)  # "self-attention blocks at the 16 × 16 resolution"
    c.model.dropout = 0.1  # "we set the dropout rate on CIFAR10 to 0.1"
    c.model.num_groups = 32  # GroupNorm's 32 groups (tf.contrib.layers.group_norm's default)
    c.model.time_input = "index"  # the network embeds the integer step t
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (GPU/TPU; params and optimiser state stay float32)
    c.model.num_classes = 0  # K > 0: class-conditional (labels 0..K-1; ddpm_jax/guidance.py) | 0: unconditional

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "eps"  # predict ε
    c.objective.weighting = "simple"  # L_simple: the unweighted ‖ε − ε_θ‖², the paper's best FID
    c.objective.reduction = "mean"  # its code averages over pixels (mean_flat), not sums

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4  # "2 × 10⁻⁴" for CIFAR-10 (Adam)
    c.optim.rho_learning_rate = 2e-4  # unused: no ρ-head
    c.optim.b1 = 0.9  # Adam's defaults, as in its code
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay_factor = 1.0
    c.optim.decay_every_epochs = 0  # constant rate after warm-up: no decay in the paper
    c.optim.warmup_steps = 5000  # its code warms the rate up linearly over 5,000 steps
    c.optim.grad_clip_norm = 1.0  # its code clips gradients to global norm 1

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # "batch size 128 for CIFAR10"
    c.train.grad_accum_steps = 1  # k > 1: each batch as k micro-batches, gradients summed (the same update, 1/k the activations)
    c.train.label_dropout = 0.0  # class-conditional: probability of training on "no class" instead of the label
    c.train.num_epochs = 0
    c.train.num_steps = 800_000  # "trained for 800k steps"
    c.train.ema_decay = 0.9999  # "EMA on model parameters with a decay factor of 0.9999"
    c.train.parallel = "jit"
    c.train.log_every_steps = 100
    c.train.max_nonfinite_steps = 10
    c.train.eval_every_epochs = 10  # 390 steps per epoch: validation loss every 3,900 steps
    c.train.sample_every_epochs = 50  # a 64-image grid costs 1,000 network evaluations
    c.train.num_grid_samples = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = "eps_ddpm"  # ancestral sampling, Algorithm 2
    c.sampling.ddpm_variance = "beta"  # σ_t² = β_t ('fixedlarge'), what its CIFAR-10 run used
    c.sampling.num_steps = 0  # DDIM only: its number of steps (0: every one of the T)
    c.sampling.eta = 0.0  # DDIM only: its η
    c.sampling.clip_x0 = True  # its sampler clips x̂_0 to [-1, 1] at every step (clip_denoised)
    c.sampling.guidance = 0.0  # class-conditional: classifier-free guidance w, (1 + w) f(x, t, c) - w f(x, t, no class)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep = 3
    return c
