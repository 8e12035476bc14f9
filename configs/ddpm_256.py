"""The 256×256 setup of Ho et al. (2020): CelebA-HQ and LSUN church, bedroom and cat.

    python -m experiments.train --config configs/ddpm_256.py:church --workdir runs/church --config.data.path=DIR
    python -m experiments.model_summary --config configs/ddpm_256.py --image_shape=256,256,3   # 113,673,219 parameters
    python -m experiments.import_checkpoint --source ddpm-ema-church-256 --workdir runs/ddpm_church \\
        --config configs/ddpm_256.py:church

The paper's U-Net (``model.name='unet'``) at six levels, 256 down to 8 pixels, with attention at
16×16, trained with the ε objective and L_simple. Each value says where it comes from: the paper's
Appendix B, or its TensorFlow implementation's ``scripts/run_celebahq.py`` and
``scripts/run_lsun.py`` (the model 'unet2d16b2c112244', "114M"). The variant after the colon
(``celebahq`` (default), ``church``, ``bedroom``, ``cat``) sets the dataset's name, its training
steps and its flips.

The images are a folder (``data.source='folder'``, ``data.path``: PNG or JPEG files of one size,
256×256; docs/data.md). The whole dataset is held in memory as float32, 256·256·3·4 bytes = 768 KiB
per image: 30,000 images (CelebA-HQ) need 23 GiB, so LSUN's larger categories need a subset.
Set ``data.train_size`` + ``data.val_size`` to at most the folder's image count. Sized for
accelerators: batch 64, 0.5M–2.4M steps.
"""

import ml_collections

#: variant -> (data.name, train.num_steps, data.random_flip)
VARIANTS = {
    "celebahq": ("celebahq256", 500_000, True),  # Appendix B: CelebA-HQ 0.5M steps
    "church": ("lsun_church", 1_200_000, True),  # LSUN church 1.2M steps
    "bedroom": ("lsun_bedroom", 2_400_000, True),  # LSUN bedroom 2.4M steps
    "cat": ("lsun_cat", 1_800_000, False),  # LSUN cat 1.8M steps; run_lsun.py's command for cat passes --randflip 0
}


def get_config(variant: str = "celebahq") -> ml_collections.ConfigDict:
    variant = variant or "celebahq"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/ddpm_256.py; choose one of {sorted(VARIANTS)}")
    name, steps, flip = VARIANTS[variant]
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "folder"  # a directory of 256x256 images (ddpm_jax/data/folder.py)
    c.data.name = name  # a label for logs; the images come from data.path
    c.data.path = ""  # required to train: the directory of images
    c.data.scale = "[-1,1]"  # as for CIFAR-10: pixels scaled linearly to [-1, 1]
    c.data.train_size = 29_000  # CelebA-HQ's 30,000 images, less the validation set; set to your folder's
    c.data.val_size = 1_000
    c.data.random_flip = flip  # run_celebahq.py / run_lsun.py: randflip=1 (cat: 0)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "linear"  # beta_start 1e-4 .. beta_end 0.02, linear, as for CIFAR-10
    c.schedule.num_steps = 1000  # T = 1000
    c.schedule.beta_start = 1e-4
    c.schedule.beta_end = 0.02

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"  # the paper's U-Net (ddpm_jax/models/ddpm_unet.py)
    c.model.ch = 128  # ch=128 in 'unet2d16b2c112244'; time embedding 4·128 = 512
    c.model.ch_mult = (1, 1, 2, 2, 4, 4)  # six levels: 256, 128, 64, 32, 16, 8 pixels
    c.model.num_res_blocks = 2  # num_res_blocks=2
    c.model.attn_resolutions = (16,)  # attn_resolutions=(16,): self-attention at 16x16
    c.model.dropout = 0.0  # dropout=0.0 in both scripts (CIFAR-10's 0.1 is its own)
    c.model.num_groups = 32  # GroupNorm's 32 groups
    c.model.time_input = "index"  # the network embeds t; an imported checkpoint gets 'index_from_zero' (t − 1)
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (params and optimiser state stay float32)
    c.model.num_classes = 0  # unconditional

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "eps"  # loss_type='noisepred': predict ε
    c.objective.weighting = "simple"  # L_simple, the unweighted ‖ε − ε_θ‖²
    c.objective.reduction = "mean"  # its code averages over pixels (meanflat)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5  # lr=2e-5 for the 256x256 models (CIFAR-10: 2e-4)
    c.optim.rho_learning_rate = 2e-5  # unused: no ρ-head
    c.optim.b1 = 0.9  # Adam's defaults
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay_factor = 1.0
    c.optim.decay_every_epochs = 0  # constant rate after warm-up
    c.optim.warmup_steps = 5000  # warmup=5000
    c.optim.grad_clip_norm = 1.0  # grad_clip=1.

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # total_bs=64
    c.train.grad_accum_steps = 1  # k > 1: each batch as k micro-batches (the same update, 1/k the activations)
    c.train.label_dropout = 0.0  # class-conditional only
    c.train.num_epochs = 0
    c.train.num_steps = steps  # per dataset, see VARIANTS
    c.train.ema_decay = 0.9999  # EMA decay 0.9999, as for CIFAR-10
    c.train.parallel = "jit"
    c.train.log_every_steps = 100
    c.train.max_nonfinite_steps = 10
    c.train.eval_every_epochs = 10
    c.train.sample_every_epochs = 0  # a 256x256 grid costs 1,000 evaluations of a 114M network: none during training
    c.train.num_grid_samples = 16

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = "eps_ddpm"  # ancestral sampling, Algorithm 2
    c.sampling.ddpm_variance = "posterior"  # σ_t² = β̃_t: diffusion_utils.py, which these scripts use, samples so
    c.sampling.num_steps = 0  # DDIM only: its number of steps (0: every one of the T)
    c.sampling.eta = 0.0  # DDIM only: its η
    c.sampling.clip_x0 = True  # x̂_0 clipped to [-1, 1] at every step (clip_denoised)
    c.sampling.guidance = 0.0  # class-conditional only

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep = 3
    return c
