"""`glm-jax train --config FILE --workdir DIR [--distributed] [--config.x.y=value ...]`."""
from __future__ import annotations

from glm_jax.cli import common


def train_main(argv: list[str]) -> int:
    from glm_jax.config import load_config, split_config_args
    rest, overrides = split_config_args(argv)
    parser = common.parser("train", "train gLM (any mesh, resumable)")
    parser.add_argument("--config", required=True, help="Python config file (configs/*.py)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/; resumed if present")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: jax.distributed.initialize() from the SLURM / TPU environment first")
    common.add_progress_argument(parser)
    args = parser.parse_args(rest)
    config = load_config(args.config, overrides)  # before anything heavy: a bad override fails at once
    common.output_dir(args.workdir)
    import jax

    from glm_jax.train.trainer import train_and_evaluate
    if args.distributed:
        jax.distributed.initialize()
    result = train_and_evaluate(config, args.workdir, progress=False if args.no_progress else None)
    final = {k: round(v, 5) for k, v in result.eval.items() if k in ("loss", "pseudo_accuracy")}
    print(f"glm-jax train: {'preempted' if result.preempted else 'stopped'} at step {result.step}; checkpoints, "
          f"metrics.jsonl and tensorboard/ in {args.workdir}{'; eval ' + str(final) if final else ''}")
    return 0
