"""Config files and command-line overrides."""
import pathlib

import pytest

from glm_jax.config import load_config, split_config_args
from glm_jax.model.glm import GLMConfig, config_from_dict_like

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_glm_base_is_the_original_model():
    model = config_from_dict_like(load_config(str(CONFIGS / "glm_base.py")).model)
    assert model == GLMConfig()
    assert (model.num_layers, model.hidden_size, model.num_heads, model.emb_dim) == (19, 1280, 10, 1281)
    assert (model.intermediate_size, model.max_position_embeddings, model.num_distances) == (3072, 512, 1023)
    assert (model.hidden_dropout, model.attention_dropout, model.layer_norm_eps) == (0.1, 0.1, 1e-12)
    assert (model.num_pred, model.num_pc, model.position_embedding_type) == (4, 100, "relative_key_query")


def test_overrides_from_the_command_line():
    argv = ["--workdir", "w", "--config.model.num_layers=4", "--config.model.compute_dtype", "bfloat16",
            "--config.optimizer.learning_rate=3e-4", "--config.model.scan_layers=false"]
    rest, overrides = split_config_args(argv)
    assert rest == ["--workdir", "w"]
    config = load_config(str(CONFIGS / "glm_base.py"), overrides)
    assert config.model.num_layers == 4 and config.model.compute_dtype == "bfloat16"
    assert config.optimizer.learning_rate == 3e-4 and config.model.scan_layers is False


def test_bad_overrides_and_configs_are_named():
    with pytest.raises(KeyError, match="model.num_layerz"):
        load_config(str(CONFIGS / "glm_base.py"), ["--config.model.num_layerz=3"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")
    with pytest.raises(ValueError, match="not divisible"):
        GLMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        GLMConfig(max_genes=600)
