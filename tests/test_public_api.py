"""The top-level API: every exported name resolves, and importing glm_jax stays light."""
import subprocess
import sys

import glm_jax


def test_every_exported_name_resolves_to_its_module_object():
    import importlib
    for name in glm_jax.__all__:
        value = getattr(glm_jax, name)
        assert value is getattr(importlib.import_module(glm_jax._EXPORTS[name]), name), name


def test_import_loads_neither_tensorflow_nor_torch_nor_jax():
    code = ("import sys, glm_jax; heavy = [m for m in ('tensorflow', 'torch', 'jax') if m in sys.modules]; "
            "assert not heavy, heavy; glm_jax.GLMConfig; assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
