"""PyTorch interoperability: checkpoint conversion and the reference model."""
