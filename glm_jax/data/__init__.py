"""Genomes -> contig windows -> features -> TFRecord shards, and the readers."""
