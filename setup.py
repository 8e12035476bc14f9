"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax, with tests of the maths."""

from setuptools import find_packages, setup

setup(
    name="ddpm_jax",
    version="0.1.0",
    description="Denoising diffusion probabilistic models in JAX/Flax: schedules, objectives, "
    "samplers, training and metrics, with numerical tests of the maths.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ddpm_jax", "ddpm_jax.*"]),
    package_data={"ddpm_jax.metrics": ["weights/*.msgpack"]},
    install_requires=[
        "jax>=0.6.1",  # jax.shard_map
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.9",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.4",
        "ml-collections>=0.1.1",
        "absl-py>=1.4",
        "tqdm>=4.64",
        "matplotlib>=3.7",
        "pillow>=13.0",  # data.source=folder (also a matplotlib dependency)
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-xdist>=3.3", "scipy>=1.11"],
    },
)
