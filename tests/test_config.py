"""Config files and command-line overrides."""
import pathlib

import pytest

from glm_jax.config import default_config, load_config, split_config_args
from glm_jax.errors import ConfigError
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
    with pytest.raises(ConfigError, match="model.num_layerz"):
        load_config(str(CONFIGS / "glm_base.py"), ["--config.model.num_layerz=3"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")
    with pytest.raises(ValueError, match="not divisible"):
        GLMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        GLMConfig(max_genes=600)


def test_shipped_configs_load_when_copied_anywhere(tmp_path):
    """Each configs/*.py starts from the package defaults and needs no sys.path trick: a copy in an
    unrelated folder loads to the same config as the original file."""
    for path in sorted(CONFIGS.glob("*.py")):
        copy = tmp_path / f"copied_{path.name}"
        copy.write_text(path.read_text())
        assert load_config(str(copy)).to_dict() == load_config(str(path)).to_dict(), path.name
        assert "sys.path" not in path.read_text(), path.name


def test_defaults_are_the_original_hyper_parameters():
    """docs/ARCHITECTURE.md: objective and optimiser values of the original train.py."""
    config = default_config()
    assert config_from_dict_like(config.model) == GLMConfig()
    assert set(config.model) == set(GLMConfig().to_dict())  # every model field, none re-listed by hand
    o, opt = config.objective, config.optimizer
    assert (o.mask_prob, o.mask_value, o.label_clip, o.prob_loss_weight, o.reduction) == (
        0.15, -1.0, 10.0, 1e-4, "all_positions")
    assert (opt.learning_rate, opt.eps, opt.warmup_steps, opt.b1, opt.b2, opt.weight_decay) == (
        1e-4, 1e-6, 5000, 0.9, 0.999, 0.0)
    assert (opt.schedule, opt.eps_after_bias_correction, opt.grad_clip_norm, opt.grad_clip_value) == (
        "warmup_constant", False, 0.0, 0.0)
    assert config.train.batch_size == 1000


def test_small_configs_change_only_what_differs():
    base = default_config().to_dict()
    tiny = load_config(str(CONFIGS / "tiny.py")).to_dict()
    assert tiny["objective"] == base["objective"]  # the original objective, CE weight included
    assert {k for k in base["model"] if base["model"][k] != tiny["model"][k]} == {
        "emb_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings", "num_pc"}
