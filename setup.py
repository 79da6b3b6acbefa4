"""jaxrlhf: the InstructGPT recipe (SFT, reward model, PPO, PPO-ptx) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="jaxrlhf",
    version="0.1.0",
    description="InstructGPT-style RLHF (SFT, K-way reward model, PPO, PPO-ptx) in JAX/Flax.",
    packages=setuptools.find_packages(include=["jaxrlhf", "jaxrlhf.*"]),
    package_data={"jaxrlhf": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "jax[cpu]>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "etils[epath]>=1.7",
        "pyarrow>=14",  # Parquet and Arrow data files
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "chex>=0.1.88",
            "torch==2.13.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "hypothesis>=6.100",
            "tensorboard>=2.17",
        ],
    },
)
