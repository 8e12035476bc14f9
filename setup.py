"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax, with tests of the maths."""

from setuptools import find_packages, setup

PARITY = ["torch>=2.14", "torchvision>=0.29", "diffusers>=0.42", "pytorch-fid>=0.3", "torch-fidelity>=0.4"]

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
        # Lower bounds: the versions the code and its tests run with (the CPU set-up passes XLA
        # flags that older jaxlib builds do not know and abort on).
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy>=2.4",
        "tensorflow-datasets>=4.9.10",  # only for datasets outside the MNIST family (data.source=tfds)
        "ml-collections>=1.1.0",
        "absl-py>=2.5.1",
        "tqdm>=4.70",
        "matplotlib>=3.11",
        "pillow>=13.0",  # data.source=folder (also a matplotlib dependency)
        "tensorboardX>=2.6.5",
        "safetensors>=0.8.0",  # released checkpoints (ddpm_jax.pretrained), read without torch
    ],
    extras_require={
        # The reference implementations the parity tests compare against, built offline with seeded
        # weights. Test dependencies only: the library never imports them.
        "parity": PARITY,
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "scipy>=1.17"] + PARITY,
    },
)
