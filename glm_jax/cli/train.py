"""`glm-jax train --config FILE --workdir DIR [--distributed] [--config.x.y=value ...]`."""
from __future__ import annotations

from glm_jax.cli import common


def train_main(argv: list[str]) -> int:
    from glm_jax.config import load_config, split_config_args
    rest, overrides = split_config_args(argv)
    parser = common.parser("train", "train gLM (any mesh, resumable)")
    parser.add_argument("--config", required=True, help="Python config file (configs/*.py)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/; resumed if present")
    common.add_distributed_arguments(parser)
    common.add_progress_argument(parser)
    args = parser.parse_args(rest)
    config = load_config(args.config, overrides)  # before anything heavy: a bad override fails at once
    common.output_dir(args.workdir)
    common.start_distributed(args)  # before anything touches jax devices
    from glm_jax.train.trainer import train_and_evaluate
    result = train_and_evaluate(config, args.workdir, progress=False if args.no_progress else None)
    from glm_jax import distributed
    if not distributed.is_primary():  # one summary for the run
        return 0
    final = {k: round(v, 5) for k, v in result.eval.items() if k in ("loss", "pseudo_accuracy")}
    print(f"glm-jax train: {'preempted' if result.preempted else 'stopped'} at step {result.step}; checkpoints, "
          f"metrics.jsonl and tensorboard/ in {args.workdir}{'; eval ' + str(final) if final else ''}")
    return 0


def launch_local_main(argv: list[str]) -> int:
    """`glm-jax launch-local --processes N [--devices-per-process K] -- COMMAND ...` (glm_jax.launcher)."""
    from glm_jax import launcher
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    parser = common.parser("launch-local", "run COMMAND as N local JAX processes of one run (GLM_JAX_* set, "
                           "output prefixed [pI]); e.g. glm-jax launch-local --processes 2 "
                           "--devices-per-process 4 -- glm-jax train --distributed --config C --workdir W",
                           usage="glm-jax launch-local --processes N [--devices-per-process K] [--port P] "
                                 "-- COMMAND [ARGS ...]")
    parser.add_argument("--processes", type=common.positive_int, required=True, help="number of processes")
    parser.add_argument("--devices-per-process", type=common.positive_int, default=None,
                        help="CPU devices per process (XLA_FLAGS --xla_force_host_platform_device_count)")
    parser.add_argument("--port", type=common.positive_int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--stop-timeout", type=float, default=launcher.STOP_TIMEOUT_S,
                        help="seconds between SIGTERM and SIGKILL for the others when one process fails "
                             "(default %(default)s)")
    args = parser.parse_args(own)
    if not command:
        parser.error("no command: put it after --")
    return launcher.launch_local(command, args.processes, args.devices_per_process, args.port, args.stop_timeout)
