"""`python -m train`: train, evaluate, caption, inspect runs, generate, fetch and convert datasets.

    python -m train fit --preset demo --run-dir runs/demo
    python -m train eval --run-dir runs/demo --epoch all --strategies greedy,beam,nucleus
    python -m train eval --run-dir runs/gpu --split test --strategies greedy,beam --captions-out captions
    python -m train score captions/*.json --annotations data/flickr8k/annotations/captions_official_test.json
    python -m train caption --run-dir runs/demo --strategy beam photo.jpg
    python -m train caption --run-dir runs/demo photos/ --out captions.csv
    python -m train info --run-dir runs/demo
    python -m train export --runs-dir runs --tensorboard runs/tensorboard --follow
    python -m train data shapes --out data/shapes
    python -m train data coco --out data/coco2017 --first 10000 --val-first 1000
    python -m train data flickr8k --images Flickr8k_Dataset.zip --text Flickr8k_text.zip --out data/flickr8k
    python -m train data shards --from data/flickr8k --out data/flickr8k-shards
    python -m train data noise --from data/flickr8k --out data/flickr8k-noisy --fraction 0.3
    python -m train data resize --from ../shared/data/flickr8k --out data/flickr8k-128 --size 128
    python -m train capfilt --captioner runs/noisy --filter runs/noisy --data data/flickr8k-noisy --out data/boot
    python -m train study studies/recipes.toml --data-root ../shared/data/flickr8k --only recipes/tuned
"""

from __future__ import annotations

import argparse
import sys

from blipcore.model.config import available_presets, load_preset  # noqa: F401  (part of this module's interface)
from train.arguments import add_resume_arguments as _add_resume_arguments  # noqa: F401  (the old name)
from train.arguments import program_name
from train.commands import capfilt, caption, data, diagnose, export, fit, info, score, study
from train.commands import eval as eval_command
from train.commands.fit import build_config  # noqa: F401  (part of this module's interface)
from train.commands.study import command_stage_words as _command_stage_words  # noqa: F401  (the old name)

# in the order --help lists
COMMANDS = (fit, eval_command, score, caption, capfilt, study, info, diagnose, export, data)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each subcommand's module adds its parser (and handler, as `func`)."""
    parser = argparse.ArgumentParser(
        prog=program_name(), description="Train and inspect BLIP models from random initialisation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run its subcommand; the return value is the exit status. Expected
    failures (a missing file or run, bad data, a non-finite loss, a bad value) are one `error:` line on stderr and
    exit status 2; Ctrl-C is 130."""
    from blipcore.data import AnnotationError, DatasetNotFoundError, ImageLoadError
    from blipcore.io import FileError
    from blipcore.training.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (FileError, DatasetNotFoundError, AnnotationError, ImageLoadError, NonFiniteLossError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
