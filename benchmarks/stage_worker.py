"""One cold `embed_proteins` run in a fresh process, for `run.py esm2 --stage`.

    python benchmarks/stage_worker.py PROTEINS_JSON MODEL_DIR STORE_DIR DTYPE MAX_TOKENS MAX_RESIDUES [ATTENTION]

The glm_jax it runs is the first one on PYTHONPATH: this checkout's, or another commit's source
(`--stage-baseline`), down to the layout before the subpackages (`glm_jax.protein_embed`). Prints
one JSON line: {"seconds", "embedded", "stored", "glm_jax"}; only the `embed_proteins` call is timed.
"""
import json
import sys
import time


def main(argv: list[str]) -> int:
    proteins_json, model_dir, store_dir, dtype, max_tokens, max_residues, *attention = argv
    import glm_jax

    try:
        from glm_jax.proteins import embed
    except ImportError:  # commits before the subpackage layout
        from glm_jax import protein_embed as embed
    with open(proteins_json) as handle:
        proteins = json.load(handle)
    options = dict(max_tokens=int(max_tokens), max_residues=int(max_residues), compute_dtype=dtype, progress=False)
    if attention:  # older commits have no attention option
        options["attention"] = attention[0]
    start = time.perf_counter()
    store = embed.embed_proteins(proteins, store_dir, model_dir, **options)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "embedded": store.last_run.embedded, "stored": len(store),
                      "glm_jax": glm_jax.__file__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
