"""gLM exactly as the original `train.py` builds it (Hwang et al. 2024), trained as it was.

The package defaults are this model (`glm_jax.config.default_config`; the model fields are documented
on `glm_jax.model.glm.GLMConfig`). Copy this file anywhere and edit it, or override any field:
    glm-jax train --config configs/glm_base.py --config.train.batch_size=256
"""
from glm_jax.config import default_config


def get_config():
    return default_config()
