"""glm-jax benchmark harness: named cases that append JSON-lines records, and the report.

    python benchmarks/run.py list
    python benchmarks/run.py CASE [case options] [--repeats N] [--quick] [--output FILE.jsonl]
    python benchmarks/run.py report [--results FILE.jsonl] [--check]

Cases (one module each in benchmarks/cases/, exporting `add_arguments(parser)` and
`run(args, recorder)`): see CASES. Every measurement is appended as one JSON line to --output
(default benchmarks/results/results.jsonl; schema in benchmarks/recorder.py). `report` rewrites
the generated tables of README.md and docs/performance.md (between `<!-- perf:NAME:begin/end -->`
markers) and the figures in docs/img/benchmarks/ from the latest record of each measurement;
`--check` only compares.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import traceback

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow otherwise (slow)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.recorder import DEFAULT_RESULTS, Recorder  # noqa: E402
from glm_jax.errors import InputError  # noqa: E402

CASES = {  # name -> (module, what it measures)
    "train_step": ("benchmarks.cases.train_step", "optimizer step, JAX vs PyTorch reference gLM (contigs/s, MFU)"),
    "forward": ("benchmarks.cases.forward", "inference forward, JAX vs PyTorch reference gLM (contigs/s)"),
    "esm2": ("benchmarks.cases.esm2", "ESM2 protein embedding, JAX vs transformers EsmModel (proteins/s)"),
    "attention": ("benchmarks.cases.attention", "attention implementations: time and memory vs contig length"),
    "input_pipeline": ("benchmarks.cases.input_pipeline",
                       "shard readers (windows/s) vs what the gLM-base train step consumes"),
    "data_pipeline": ("benchmarks.cases.data_pipeline",
                      "make-shards on a synthetic metagenome: peak RSS, genes/s vs corpus size"),
    "store_lookup": ("benchmarks.cases.store_lookup", "embedding store get of random keys: time, peak RSS vs rows"),
}


class CaseUnavailable(RuntimeError):
    """A registered case whose module is not in this checkout."""


def load_case(name: str):
    module_name = CASES[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        path = module_name.replace(".", "/") + ".py"
        raise CaseUnavailable(f"case {name!r} is registered but {path} is not in this checkout") from None


def case_parser(name: str, module) -> argparse.ArgumentParser:
    """The harness options first; a case may redefine them (conflict_handler='resolve')."""
    parser = argparse.ArgumentParser(prog=f"run.py {name}", description=(module.__doc__ or "").split("\n")[0],
                                     conflict_handler="resolve")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_RESULTS,
                        help="JSON-lines file the records are appended to (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first one compiles)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 1 repeat: checks the case end to end")
    module.add_arguments(parser)
    return parser


def run_case(name: str, argv: list[str]) -> int:
    try:
        module = load_case(name)
    except CaseUnavailable as error:
        print(f"run.py {name}: {error}", file=sys.stderr)
        return 2
    args = case_parser(name, module).parse_args(argv)
    if args.quick:
        args.repeats = 1
    recorder = Recorder(args.output, command=[name, *argv])
    try:
        module.run(args, recorder)
    except InputError as error:  # bad user data (a --fasta, --genomes file): say so, record nothing more
        print(f"run.py {name}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # keep what the case recorded so far, and say what broke
        traceback.print_exc()
        recorder.record(case=name, config="-", impl="-", status="failed",
                        reason=f"case crashed: {type(error).__name__}: {str(error)[:300]}")
        return 1
    print(f"{len(recorder.records)} records appended to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: run.py {list,report," + ",".join(CASES) + "} [options]  (run.py CASE --help)"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        for name, (module, what) in CASES.items():
            present = (REPO / (module.replace(".", "/") + ".py")).is_file()
            print(f"{name:16s} {what}{'' if present else '  [module missing]'}")
        return 0
    if command == "report":
        from benchmarks import report

        return report.main(rest)
    if command not in CASES:
        print(f"run.py: error: unknown case {command!r}; {usage}", file=sys.stderr)
        return 2
    return run_case(command, rest)


if __name__ == "__main__":
    from glm_jax.perf_defaults import REUSING_MALLOC_TUNABLES, restart_with_huge_pages

    # both sides of every comparison under the same allocator, one that does not handicap PyTorch
    restart_with_huge_pages(REUSING_MALLOC_TUNABLES)
    sys.exit(main())
