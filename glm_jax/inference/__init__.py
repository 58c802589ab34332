"""Running trained models: forward on batches, embeddings."""
