"""`glm-jax embed`: per-gene outputs of a trained model on shards, padding removed."""
import numpy as np

from glm_jax.model import checkpoint
from glm_jax.cli import main as cli
from glm_jax.model.glm import GLMConfig, create_model

from helpers import SHARD_EMB_DIM, SHARD_GENES, SHARD_NUM_PC, random_shard_records, write_shard_dataset


def test_embed_writes_one_row_per_real_gene_matching_the_model(tmp_path):
    arrays = random_shard_records(20, seed=3)
    write_shard_dataset(tmp_path / "shards", arrays, num_shards=2, split="eval")
    config = GLMConfig(emb_dim=SHARD_EMB_DIM, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                       max_position_embeddings=SHARD_GENES, max_genes=SHARD_GENES,
                       num_pc=SHARD_NUM_PC)
    model = create_model(config, seed=4)
    checkpoint.save_model(tmp_path / "model", model)
    assert cli.main(["embed", "--checkpoint", str(tmp_path / "model"), "--shards", str(tmp_path / "shards"),
                     "--split", "eval", "--output", str(tmp_path / "genes.npz"), "--batch-size", "6",
                     "--all-layers"]) == 0
    out = np.load(tmp_path / "genes.npz")
    n_genes = int(arrays["attention_mask"].sum())
    assert out["embeddings"].shape == (n_genes, 16)
    assert out["hidden_states"].shape == (n_genes, 3, 16)
    np.testing.assert_array_equal(out["hidden_states"][:, -1], out["embeddings"])
    assert out["predictions"].shape == (n_genes, 4, SHARD_NUM_PC)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
    assert sorted(out["gene_ids"]) == sorted(arrays["gene_ids"][arrays["attention_mask"] > 0].astype(str))
    # every window's rows equal the model run directly on that window (no masking)
    window = int(np.flatnonzero(arrays["contig_id"] == out["contig_ids"][0])[0])
    direct = model(arrays["inputs_embeds"][window:window + 1].astype(np.float32),
                   arrays["attention_mask"][window:window + 1])
    rows = out["contig_ids"] == out["contig_ids"][0]
    length = int(arrays["num_genes"][window])
    np.testing.assert_array_equal(out["positions"][rows], np.arange(length))
    np.testing.assert_allclose(out["embeddings"][rows], np.asarray(direct.last_hidden_state[0, :length]), atol=1e-5)
