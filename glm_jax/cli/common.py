"""What several commands share: parsers, the options of commands that run a model, output paths."""
from __future__ import annotations

import argparse
import os
import pathlib

from glm_jax.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


def parser(command: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """The argument parser of `glm-jax COMMAND` (its errors read `glm-jax COMMAND: error: ...`)."""
    return argparse.ArgumentParser(prog=f"glm-jax {command}", description=description, **kwargs)


def add_model_run_arguments(parser: argparse.ArgumentParser, batch_help: str = "contigs per device call",
                            batch_size: int = 64, attention_options: bool = True) -> None:
    """--checkpoint, --batch-size, --dtype, --attention, --clip-distances: the options of every
    command that runs a trained model (`model_changes` turns them into GLMConfig changes)."""
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=batch_help)
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="compute dtype (float16 is what the original's fp16 autocast ran)")
    if attention_options:  # infer names the kernel --attention-impl (its --attention selects outputs)
        add_attention_arguments(parser, "--attention", None, "the checkpoint's, normally 'reference'")


def add_attention_arguments(parser: argparse.ArgumentParser, flag: str, default: str | None,
                            default_help: str) -> None:
    """The attention implementation option (`flag`) and --clip-distances."""
    from glm_jax import kernels
    parser.add_argument(flag, choices=tuple(kernels.IMPLEMENTATIONS), default=default,
                        help=f"attention implementation (default: {default_help}); "
                             "only reference and xla_shifted return attention maps")
    parser.add_argument("--clip-distances", action="store_true",
                        help="gene distances beyond the model's max_position_embeddings - 1 use the "
                             "distance table's end rows (Shaw et al. 2018), so contigs of any length run")


def add_esm2_attention_argument(parser: argparse.ArgumentParser, flag: str) -> None:
    """How ESM2 attends (glm_jax.proteins.esm2.ATTENTION); the default depends on platform and dtype."""
    from glm_jax.proteins import esm2
    parser.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"), choices=sorted(esm2.ATTENTION), default=None,
                        help="ESM2 attention: query_blocks (the default on CPU and in float32) or dot_product "
                             "(jax.nn.dot_product_attention: cuDNN's fused kernel, the default for 16-bit "
                             "compute on NVIDIA GPUs)")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: a bar on a terminal, else a line every 30 s)")


def add_unknown_residue_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map-unknown-to-x", action="store_true",
                        help="embed protein residues outside the ESM2 alphabet (digits, '%%', internal '*') as X "
                             "instead of refusing the record")


def unknown_residues(args: argparse.Namespace) -> str:
    """The `unknown` policy of glm_jax.data.fasta for the parsed arguments."""
    return "x" if args.map_unknown_to_x else "error"


def model_changes(args: argparse.Namespace) -> dict:
    """GLMConfig fields the model-run options change at load time (numerics only, never shapes)."""
    changes = {"compute_dtype": args.dtype}
    if args.attention is not None:
        changes["attention"] = args.attention
    if args.clip_distances:
        changes["clip_distances"] = True
    return changes


def load_model(args: argparse.Namespace):
    """The model named by --checkpoint, with `model_changes(args)` applied."""
    from glm_jax.inference.predict import load_any_model
    return load_any_model(args.checkpoint, **model_changes(args))


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """--distributed and the explicit cluster options (glm_jax.distributed says where a run's
    processes come from when they are left out)."""
    group = parser.add_argument_group("several processes (glm_jax.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="run as one of several JAX processes: under SLURM (srun) or on a TPU pod found "
                            "automatically, else from --coordinator/--num-processes/--process-id or GLM_JAX_* "
                            "(what glm-jax launch-local sets)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (with --distributed)")
    group.add_argument("--num-processes", type=positive_int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def start_distributed(args: argparse.Namespace) -> None:
    """Joins the run when --distributed was given (before any jax computation); else nothing."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed:
        if any(v is not None for v in explicit):
            raise InputError("--coordinator, --num-processes and --process-id need --distributed")
        return
    from glm_jax import distributed
    distributed.initialize(*explicit)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def output_file(path: str | pathlib.Path) -> pathlib.Path:
    """Checks, before any work, that the file `path` can be written (see `writable`)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; give a file name")
    writable(path.absolute().parent)
    return path


def output_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Checks, before any work, that the folder `path` can be written (see `writable`)."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} exists and is not a directory")
    writable(path.absolute())
    return path


def writable(folder: pathlib.Path) -> None:
    """Raises InputError unless files can be written in `folder` (absolute): it, or its nearest
    existing ancestor when it is missing, must be a writable directory. Nothing is created here,
    so a run that fails later leaves no empty folders behind."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write into {folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {folder}: {existing} is not writable")


def save_npz(path: pathlib.Path, arrays: dict) -> None:
    """Writes the output .npz atomically (its folder created if missing)."""
    from glm_jax import files
    files.savez_atomic(path, **arrays)
