"""The gLM model: configuration, encoder, objective and model directories."""
