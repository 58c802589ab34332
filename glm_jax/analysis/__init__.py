"""The paper's analyses on gene/pair tables: operons, linear probes, hypotheses and paralogs, plots."""
