"""The `glm-jax` command line."""
