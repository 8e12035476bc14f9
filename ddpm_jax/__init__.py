"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax.

The functional API (pure, jit-safe; docs/conventions.md gives the conventions):

  ddpm_jax.schedules   make_schedule, Schedule
  ddpm_jax.diffusion   q_sample, q_sample_pair, q_posterior, conversions between ε, x_0, v, μ
  ddpm_jax.objectives  the training losses, selected by name
  ddpm_jax.bounds      the variational bound (negative ELBO) in nats and bits/dim
  ddpm_jax.analytic    the exact optimal denoiser for Gaussian data
  ddpm_jax.sampling    reverse-process samplers, each one lax.scan
  ddpm_jax.models      the U-Net (ScoreNet) and make_model_fn
  ddpm_jax.data        datasets (TFDS, IDX), the notebook's split, deterministic sharded batches

Training lives in ddpm_jax.trainer (train_and_evaluate) and ddpm_jax.runs (load_run).
"""

from ddpm_jax import analytic, bounds, data, diffusion, models, objectives, rng, sampling, schedules

__version__ = "0.1.0"

__all__ = ["analytic", "bounds", "data", "diffusion", "models", "objectives", "rng", "sampling", "schedules", "__version__"]
