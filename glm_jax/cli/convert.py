"""`glm-jax convert-torch` and `glm-jax export-torch`: weights both ways with the original gLM."""
from __future__ import annotations

from glm_jax.cli import common


def convert_torch_main(argv: list[str]) -> int:
    from glm_jax.config import split_config_args
    from glm_jax.interop import convert
    argv, overrides = split_config_args(argv)
    parser = common.parser("convert-torch", "original PyTorch gLM state dict -> glm-jax model directory")
    parser.add_argument("source", help="original gLM state dict (glm.bin, pytorch_model.bin, .safetensors)")
    parser.add_argument("destination", help="glm-jax model directory to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", help="glm-jax config file (plus --config.x=y overrides)")
    group.add_argument("--hf-config", help="the original's RobertaConfig as JSON (config.json)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    common.output_dir(args.destination)
    report = convert.convert_torch(args.source, args.destination, hf_config_path=args.hf_config,
                                   config_path=args.config, overrides=overrides, overwrite=args.overwrite)
    print(f"converted {args.source} -> {args.destination}: {report['used_values']:,} parameters used by the forward "
          f"pass; dropped {report['dropped_tensors']} unused tensors ({report['dropped_values']:,} values)")
    return 0


def export_torch_main(argv: list[str]) -> int:
    from glm_jax.interop import convert
    parser = common.parser("export-torch", "glm-jax model directory -> original gLM state dict")
    parser.add_argument("source", help="glm-jax model directory")
    parser.add_argument("destination", help="output .bin/.pt (torch.save) or .safetensors")
    args = parser.parse_args(argv)
    common.output_file(args.destination)
    count, config_path = convert.export_torch(args.source, args.destination)
    print(f"exported {args.source} -> {args.destination} ({count} tensors) and {config_path}; "
          "load it into the original gLM with load_state_dict(..., strict=False), as its glm_embed.py does")
    return 0
