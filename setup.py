"""glm-jax: a JAX/Flax (NNX) reimplementation of gLM, the genomic language model."""
from setuptools import find_packages, setup

setup(
    name="glm-jax",
    version="0.1.0",
    description="High-performance JAX/Flax gLM (genomic language model) with ESM2 feature pipeline",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["glm_jax", "glm_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy>=2.0",
        "einops>=0.8",
        # ml-collections: ConfigDict configs as Python files with dotted overrides (big_vision, lm1b).
        "ml-collections>=1.0",
        # transformers 4.57.x: the last release that implements relative_key_query (5.x ignores it)
        # and the EsmTokenizer / EsmConfig we reuse.
        "transformers>=4.57,<5",
        "safetensors>=0.4",
        "biopython>=1.83",
        "tqdm>=4.60",
        # glm-jax infer writes its per-gene tables as parquet; read_gene_table returns a DataFrame.
        "pyarrow>=14",
        "pandas>=2.0",
        # the analyses (operons, probes, plots) and the benchmark report
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tensorflow-cpu>=2.16; platform_system != 'Darwin'",
        "tensorflow-datasets>=4.9",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is only needed to read/write PyTorch checkpoints and for the parity references.
        "torch": ["torch>=2.2"],
        "genecall": ["pyrodigal>=3.0"],
        "test": ["pytest>=8", "torch>=2.2", "scikit-learn>=1.3", "pyrodigal>=3.0"],
        # the documentation site (mkdocs.yml; `mkdocs build --strict` runs in tests/test_docs.py)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": ["glm-jax=glm_jax.cli.main:main"]},
)
