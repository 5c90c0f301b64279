"""BLIP Lab's command line: `python -m train {fit,eval,caption,info,data} --help`."""
