"""The subcommands of `python -m train`, one module each: `add_parser(subparsers)` and its handler `run(args)`."""
