"""The strong MNIST recipe: the U-Net of Ho et al. (2020) scaled to 28×28×1 and to 90 minutes of
training on a 2-core CPU, sampled with the ancestral sampler in 100 network evaluations.

    python -m experiments.train --config configs/mnist_unet.py --workdir runs/mnist_unet \\
        [--config.data.path=DIR]      # offline: a directory of the MNIST IDX files
    python -m experiments.score_checkpoints --workdir runs/mnist_unet --num 2000    # quality against minutes
    python -m experiments.model_summary --config configs/mnist_unet.py
    python -m experiments.train --config configs/mnist_unet.py:conditional --workdir runs/mnist_cond   # class-conditional

Each choice and the measurement behind it (docs/results.md, "The strong recipe"):

- Width. The budget is time. ch 16 with attention only at 7×7 costs 0.09 GFLOP per image forward
  (280,177 parameters) and trains at a median 263 images/s here: 25 epochs in 85 minutes. ch 32
  with attention at 14×14 costs 4.4× that (0.40 GFLOP, 1,112,801 parameters), which would leave
  about 6 epochs for the same minutes (model_summary's counts: docs/results/mnist_unet/).
- Schedule: the paper's T = 1000, linear β 1e-4..0.02, data in [−1, 1]; with the strided samplers the number of
  network evaluations is set at sampling time, independent of T.
- Adam 1e-3 after 200 warm-up steps, clipped at norm 1: a network this small trains at it without
  a loss spike (after step 500 no logged training loss above 0.032); no decay, so a checkpoint at
  minute m stands for a run stopped there.
- Noise levels and EMA (docs/results.md, "Loss weightings, noise levels and EMA at equal compute";
  docs/results/study_training/full/study_training_n2000.json): t drawn by importance sampling
  (``train.t_sampling='importance'``) and EDM2's power EMA of width σ_rel 0.2 (``train.ema='power'``).
  At 9,750 steps × 128 and N = 2,000 the importance run with its post-hoc EMA of σ_rel 0.2 scores
  classifier FID 9.65, uniform t with the constant EMA 0.999 11.40 (uniform t with σ_rel 0.2: 10.50;
  importance with 0.999: 10.78). The σ_rel 0.2 figures are post-hoc reconstructions from the tracked
  0.05/0.10 EMAs (weights within 6 % L1 of the target profile), not a run with ``train.ema='power'``.
- No dropout: the run is far from overfitting (validation loss within 2 % of the training loss at
  every evaluation).
- Sampler: the ancestral sampler on 100 respaced steps ('ddim' with η = 1), x̂_0 clipped to
  [−1, 1]: classifier FID 11.0 (uniform t, EMA 0.999) against 16.0–17.4 for the deterministic samplers at 100 evaluations
  (docs/results.md, "Fewer network evaluations"). For about 20 evaluations use
  ``--method heun --num_steps 10`` or ``--method dpm_solver_pp --num_steps 20``.
"""

import ml_collections


VARIANTS = ("", "conditional")

#: Training recipes compared at equal compute by experiments.study_training: name -> overrides of
#: this config (docs/training.md; results: docs/results.md, "Loss weightings, noise levels and EMA").
_UNIFORM_CONSTANT = {"train.t_sampling": "uniform", "train.ema": "constant"}
RECIPES = {
    "adopted": {},  # this config as it is: importance-sampled t, power EMA σ_rel 0.2
    "baseline": dict(_UNIFORM_CONSTANT),  # L_simple, uniform t, constant EMA 0.999
    "min_snr": {**_UNIFORM_CONSTANT, "objective.weighting": "min_snr"},  # Hang et al. 2023, γ = 5
    "p2": {**_UNIFORM_CONSTANT, "objective.weighting": "p2"},  # Choi et al. 2022, k = 1, γ = 1
    "log_normal_edm": {**_UNIFORM_CONSTANT, "train.t_sampling": "log_normal", "objective.weighting": "edm"},  # Karras et al. 2022
    "importance": {"train.t_sampling": "importance", "train.ema": "constant"},  # Nichol & Dhariwal 2021
    "min_snr_importance": {"objective.weighting": "min_snr", "train.t_sampling": "importance", "train.ema": "constant"},
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; valid variants: {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # IDX files: data.path if given, else the per-user cache (downloaded once); see ddpm_jax.data.sources
    c.data.name = "mnist"
    c.data.path = ""
    c.data.url = ""
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
    c.model.ch = 16
    c.model.ch_mult = (1, 2, 2)  # three levels: 28, 14, 7 pixels (2² divides 28)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (7,)
    c.model.dropout = 0.0
    c.model.num_groups = 8  # divides 16 and 32
    c.model.time_input = "index"
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (GPU/TPU; params and optimiser state stay float32)
    c.model.num_classes = 0  # K > 0: class-conditional (labels 0..K-1; ddpm_jax/guidance.py) | 0: unconditional

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "eps"
    c.objective.weighting = "simple"  # L_simple | 'elbo' | 'min_snr' | 'p2' | 'edm' (ddpm_jax/weightings.py)
    c.objective.min_snr_gamma = 5.0  # 'min_snr': min(SNR, γ) on the x_0 error (Hang et al. 2023: γ = 5)
    c.objective.p2_k = 1.0  # 'p2': 1/(k + SNR)^γ on the ε error (Choi et al. 2022: k = 1, γ = 1 or 0.5)
    c.objective.p2_gamma = 1.0
    c.objective.edm_sigma_data = 0.5  # 'edm': (σ² + σ_data²)/(σ σ_data)² on the x_0 error, σ² = 1/SNR
    c.objective.reduction = "mean"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.rho_learning_rate = 2e-4  # unused: no ρ-head
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.decay_factor = 1.0
    c.optim.decay_every_epochs = 0
    c.optim.warmup_steps = 200
    c.optim.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.grad_accum_steps = 1  # k > 1: each batch as k micro-batches, gradients summed (the same update, 1/k the activations)
    c.train.label_dropout = 0.0  # class-conditional: probability of training on "no class" instead of the label
    c.train.num_epochs = 25
    c.train.num_steps = 0
    c.train.ema_decay = 0.999
    c.train.ema = "power"  # 'power': EDM2's power EMA of width ema_sigma_rel (docs/ema.md) | 'constant': ema_decay
    c.train.ema_sigma_rel = 0.2  # the best of 0.05/0.1/0.2 reconstructed post hoc (module docstring)
    c.train.ema_snapshot_sigma_rels = ()  # e.g. (0.05, 0.1): tracked and saved for experiments.posthoc_ema
    c.train.t_sampling = "importance"  # 'importance' (improved DDPM) | 'uniform' | 'log_normal' (in σ) (docs/training.md)
    c.train.t_log_normal_mean = -1.2  # 'log_normal': ln σ ~ N(mean, std²), EDM's values
    c.train.t_log_normal_std = 1.2
    c.train.t_importance_history = 10  # 'importance': terms kept per t, and the uniform share
    c.train.t_importance_uniform = 0.001
    c.train.parallel = "jit"
    c.train.log_every_steps = 50
    c.train.max_nonfinite_steps = 10
    c.train.eval_every_epochs = 5
    c.train.sample_every_epochs = 5
    c.train.num_grid_samples = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = "ddim"
    c.sampling.num_steps = 100
    c.sampling.eta = 1.0  # the ancestral sampler on the respaced steps
    c.sampling.ddpm_variance = "posterior"
    c.sampling.clip_x0 = True  # clip x̂_0 to [-1, 1] each step, as the paper's sampler does
    c.sampling.guidance = 0.0  # class-conditional: classifier-free guidance w, (1 + w) f(x, t, c) - w f(x, t, no class)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 975  # every 2.5 epochs
    c.checkpoint.keep = 10
    if variant == "conditional":  # the same recipe told which digit to draw (classifier-free guidance)
        c.model.num_classes = 10
        c.train.label_dropout = 0.1  # 10 % of the steps' labels replaced by "no class"
        c.sampling.guidance = 0.5  # 99.8 % drawn as asked; w = 0.25: 98.98 % (uniform t, EMA 0.999; docs/results.md, class-conditional)
    return c
