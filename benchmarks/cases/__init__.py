"""One module per benchmark case; each exports `add_arguments(parser)` and `run(args, recorder)`."""
