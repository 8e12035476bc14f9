"""Sample-quality metrics.

  ddpm_jax.metrics.fid             Fréchet distance (FID) on features: frechet_distance,
                                   feature_statistics, fid_from_features, pixel_features,
                                   cached statistics files (save/load_statistics, fid_from_statistics)
  ddpm_jax.metrics.classifier      a small MNIST classifier used as a feature extractor
  ddpm_jax.metrics.inception       pytorch-fid's FID Inception-v3 in Flax: weights, batched features
  ddpm_jax.metrics.inception_metrics  Inception FID, IS, KID, precision/recall; pytorch-fid's .npz statistics
  ddpm_jax.metrics.sample_quality  the lecture's table metrics; trajectory metrics

Only ``fid`` is imported here; import the other submodules explicitly (they may pull in JAX/Flax).
"""

from ddpm_jax.metrics import fid  # noqa: F401
