"""glm-jax: JAX/Flax (NNX) gLM, the genomic language model of Hwang et al. (2024)."""
__version__ = "0.1.0"
