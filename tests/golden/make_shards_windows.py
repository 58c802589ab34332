"""Writes tests/golden/make_shards_windows.json: what `make-shards` writes for the shipped genomes,
window by window, recorded with the code before streaming make-shards (commit 078db96).

Run with the old code first on the path, from outside the repository (else the checkout's
glm_jax wins):
    git archive 078db96 glm_jax | tar -x -C /tmp/old
    cd /tmp && PYTHONPATH=/tmp/old python /path/to/glm-jax/tests/golden/make_shards_windows.py The embeddings are a
deterministic hash of each sequence (no model), the normalisation a fixed seeded one, so every
field of every record is reproducible; the fitted normalisation is recorded too (golden npz).
tests/test_make_shards_stream.py holds the digest rule (`window_digests`) and compares.
"""
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import test_make_shards_stream as t  # noqa: E402

from glm_jax.data import make_shards as pipeline  # noqa: E402

if __name__ == "__main__":
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        golden = {}
        for name, options in t.GOLDEN_VARIANTS.items():
            out = pathlib.Path(tmp) / name
            pipeline.make_shards(t.SHIPPED, out, t.HashEmbeddings(), transform=t.fixed_transform(), **options)
            golden[name] = t.window_digests(out)
        (REPO / "tests/golden/make_shards_windows.json").write_text(json.dumps(golden, indent=0, sort_keys=True))
        fitted = pathlib.Path(tmp) / "fitted"
        pipeline.make_shards(t.SHIPPED, fitted, t.HashEmbeddings(), num_components=t.NUM_COMPONENTS,
                             **t.GOLDEN_VARIANTS["by_contig"])
        with np.load(fitted / "normalization.npz") as f:
            np.savez(REPO / "tests/golden/make_shards_normalization.npz", **dict(f))
    print({name: {k: len(v) for k, v in g.items()} for name, g in golden.items()})
