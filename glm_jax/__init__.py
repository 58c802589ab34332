"""glm-jax: JAX/Flax (NNX) gLM, the genomic language model of Hwang et al. (2024).

The public API, importable from the top level; each name is loaded on first use so that
`import glm_jax` stays cheap (no JAX compilation, TensorFlow or PyTorch at import):

    from glm_jax import GLMConfig, load_any_model, forward, read_genomes
"""
import importlib

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    # model
    "GLM": "glm_jax.model.glm",
    "GLMConfig": "glm_jax.model.glm",
    "GLMOutput": "glm_jax.model.glm",
    "create_model": "glm_jax.model.glm",
    "abstract_model": "glm_jax.model.glm",
    "validate_batch": "glm_jax.model.batch",
    # model directories and training workdirs
    "save_model": "glm_jax.model.checkpoint",
    "load_model": "glm_jax.model.checkpoint",
    "read_model_config": "glm_jax.model.checkpoint",
    "load_model_from_workdir": "glm_jax.train.checkpoint",
    "load_any_model": "glm_jax.inference.predict",
    # inference
    "forward": "glm_jax.inference.predict",
    "embed_windows": "glm_jax.inference.predict",
    "infer_genomes": "glm_jax.inference.genome",
    "read_gene_table": "glm_jax.inference.genome",
    "read_pair_table": "glm_jax.inference.genome",
    # configs
    "default_config": "glm_jax.config",
    "load_config": "glm_jax.config",
    # data
    "read_genomes": "glm_jax.data.genomes",
    "iter_contigs": "glm_jax.data.genomes",
    "read_fasta": "glm_jax.data.fasta",
    "contig_windows": "glm_jax.data.windows",
    "ShardReader": "glm_jax.data.shards",
    "InMemoryWindows": "glm_jax.data.shards",
    "make_shards": "glm_jax.data.make_shards",
    "fit_normalization": "glm_jax.data.make_shards",
    # proteins
    "load_esm2": "glm_jax.proteins.esm2",
    "EmbeddingStore": "glm_jax.proteins.embed",
    "embed_proteins": "glm_jax.proteins.embed",
    # training
    "train_and_evaluate": "glm_jax.train.trainer",
    # PyTorch interop
    "read_state_dict": "glm_jax.interop.state_dict",
    "convert_torch": "glm_jax.interop.convert",
    "export_torch": "glm_jax.interop.convert",
    # errors (glm_jax/errors.py): what the command line reports as one line, exit status 2
    "GlmJaxError": "glm_jax.errors",
    "InputError": "glm_jax.errors",
    "ConfigError": "glm_jax.errors",
    "CheckpointError": "glm_jax.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
