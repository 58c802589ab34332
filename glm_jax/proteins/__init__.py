"""ESM2 protein language model in JAX and the protein embedding store."""
