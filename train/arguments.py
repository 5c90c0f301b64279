"""The argument builders and value types every subcommand of `python -m train` shares, so one thing is spelled
one way everywhere:

- `--device auto|cpu|cuda` (default auto: CUDA when torch sees one) on every command that computes;
- `--run-dir RUN` for the run a command works on, with `--epoch N|last|all` where an epoch applies;
- `RUN[:EPOCH]` for a reference to another run (`fit --init`, `capfilt --captioner / --filter`);
- `--resume` / `--overwrite` (never both) and `--no-progress` on every command that writes a folder;
- an old spelling keeps working for one release, with a one-line deprecation message on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from blipcore.model.config import DEVICES

EPOCH_WORDS = ("last", "all")


# --- value types -------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def timeout(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    value = seconds(text)
    if not value:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: whole numbers separated by commas, e.g. 0,1,2."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, e.g. 0,1; got {text!r}") \
            from None


def epoch_spec(text: str) -> int | list[int] | str:
    """argparse type of `--epoch`: `last`, `all`, an epoch number N, or a comma list N,M (returned as an int, a
    list of ints, or the word)."""
    word = text.strip().lower()
    if word in EPOCH_WORDS:
        return word
    try:
        epochs = [int(part) for part in word.split(",")]
    except ValueError:
        epochs = [-1]
    if any(epoch < 0 for epoch in epochs):
        raise argparse.ArgumentTypeError(f"expected an epoch number N, N,M, last or all; got {text!r}")
    return epochs[0] if len(epochs) == 1 else epochs


def one_epoch_spec(text: str) -> int | str:
    """argparse type of `--epoch` where one checkpoint is used: an epoch number N or `last`."""
    value = epoch_spec(text)
    if value == "all" or isinstance(value, list):
        raise argparse.ArgumentTypeError(f"this command uses one checkpoint: an epoch number N or last; got {text!r}")
    return value


def run_reference(text: str) -> str:
    """argparse type of a reference to another run, `RUN[:EPOCH]`: the run folder, optionally one epoch of it
    (default its newest checkpoint; `RUN:last` is the same as RUN). Returned as the text the run layer reads
    (blipcore.runs.rundir.parse_run_spec)."""
    from blipcore.runs.rundir import parse_run_spec

    if not text.strip():
        raise argparse.ArgumentTypeError("expected RUN[:EPOCH], e.g. runs/demo or runs/demo:3")
    _, epoch = parse_run_spec(text)
    if epoch is None and text.lower().endswith(":last") and not Path(text).exists():
        return text[: -len(":last")]
    return text


def device_name(text: str) -> str:
    """argparse type of `--device`: auto, cpu, cuda, or one GPU of several as cuda:N."""
    word = text.strip().lower()
    if word in DEVICES or (word.startswith("cuda:") and word[5:].isdigit()):
        return word
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N; got {text!r}")


def run_epoch(spec: int | str | None) -> int | None:
    """The checkpoint epoch an `--epoch` value names for RunDir.load_model / checkpoint: None for the newest."""
    return None if spec in (None, "last") else int(spec)


# --- argument builders -------------------------------------------------------------------------
def add_device_argument(parser: Any, what: str = "runs", indexed: bool = True, note: str = "") -> None:
    """--device auto|cpu|cuda (with `indexed`, also cuda:N), default auto (CUDA when torch sees a GPU, else the
    CPU)."""
    parser.add_argument("--device", type=device_name, choices=None if indexed else DEVICES, default="auto",
                        action=ExplicitStore, metavar="auto|cpu|cuda" + ("[:N]" if indexed else ""),
                        help=f"where the model {what}: auto (default: CUDA when torch sees a GPU, else the CPU), "
                             "cpu or cuda" + (" (cuda:N: GPU N)" if indexed else "") + f", e.g. --device cpu{note}")


def add_run_dir_argument(parser: Any, help: str, required: bool = True) -> None:
    """--run-dir RUN: the run folder (one holding run.json) a command works on."""
    parser.add_argument("--run-dir", required=required, metavar="RUN", help=help)


def add_epoch_argument(parser: Any, many: bool) -> None:
    """--epoch: `N|last|all` (with `many`; also N,M) or, where one checkpoint is used, `N|last`; default last."""
    if many:
        parser.add_argument("--epoch", type=epoch_spec, default="last", metavar="N|last|all",
                            help="which checkpoints: an epoch number, a comma list (1,3), last (default: the "
                                 "newest) or all, e.g. --epoch all")
    else:
        parser.add_argument("--epoch", type=one_epoch_spec, default="last", metavar="N|last",
                            help="which checkpoint: an epoch number or last (default: the newest), e.g. --epoch 3")


def add_resume_arguments(parser: argparse.ArgumentParser, resume: str, overwrite: str,
                         progress: str = "no progress bar") -> None:
    """--resume or --overwrite (never both; help texts `resume`, `overwrite`), and --no-progress: every command
    that writes a folder."""
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume)
    again.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--no-progress", action="store_true", help=progress)


def add_source_and_out(parser: argparse.ArgumentParser, out_help: str, out_metavar: str = "DIR2") -> None:
    """--from DIR (a dataset folder) and --out: the data commands that make a folder from another."""
    parser.add_argument("--from", dest="source", required=True, metavar="DIR", help="a COCO-caption-format folder")
    parser.add_argument("--out", required=True, metavar=out_metavar, help=out_help)


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """--image-size, the HTTP policy, --resume / --overwrite and --no-progress: shared by the data commands."""
    parser.add_argument("--image-size", type=positive_int, metavar="N",
                        help="shrink every image whose shorter side is longer than N pixels so that side is N "
                             "(aspect kept, JPEG quality 90); smaller images are kept as they are. Default: keep all")
    parser.add_argument("--timeout", type=timeout, default=30.0, metavar="S",
                        help="seconds to wait for a connection or for the next bytes (default 30)")
    parser.add_argument("--retries", type=count, default=3, metavar="N",
                        help="retries of a timed-out, dropped or HTTP 5xx/429 request (default 3)")
    parser.add_argument("--backoff", type=seconds, default=1.0, metavar="S",
                        help="seconds before the first retry, doubled before each next one (default 1)")
    add_resume_arguments(parser, "continue an earlier run into --out: only what is missing or failed is fetched",
                         "start again in an --out that holds something: deletes what this command writes there "
                         "(nothing else; downloads/ is kept)")


class ExplicitStore(argparse.Action):
    """A plain store that also records that the option was given (`args.<dest>_given`): for a default that must
    not override a value from elsewhere (fit's --device over the preset's train.device)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether an ExplicitStore option was on the command line (not just its default)."""
    return bool(getattr(args, f"{dest}_given", False))


# --- deprecations and echoes of the command line -----------------------------------------------
def deprecated(old: str, new: str) -> None:
    """One line on stderr: an old spelling still works for this release; `new` is the one to use."""
    print(f"deprecated: {old} -> use {new} (the old spelling goes in the next release)", file=sys.stderr)


def resolve_device(name: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cuda` without one is a ValueError (one line, exit 2)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but torch sees no CUDA device; use --device auto or cpu")
    return name


def program_name() -> str:
    """How the user called us, for usage lines: `python -m train` or the `bliplab` console command."""
    name = Path(sys.argv[0]).name
    return "python -m train" if name in ("__main__.py", "") else name


def again_with_resume(args: argparse.Namespace) -> str:
    """The command line the user gave, with --resume in place of --overwrite: how to continue a command."""
    words = [word for word in args.argv if word not in ("--overwrite", "--resume")]
    return f"{program_name()} {shlex.join(words)} --resume"


def interrupted(args: argparse.Namespace, kept: str) -> int:
    """Say what an interrupted command kept (`kept`) and the command line that continues it; exit status 130."""
    print(f"interrupted: {kept}; continue with:\n  {again_with_resume(args)}", file=sys.stderr)
    return 130
