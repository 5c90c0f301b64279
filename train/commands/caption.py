"""`caption`: caption image files and folders with a checkpoint of a run."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from train.arguments import (
    add_device_argument,
    add_epoch_argument,
    add_run_dir_argument,
    positive_int,
    resolve_device,
    run_epoch,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what `caption` takes from a folder
CAPTION_OUT_FORMATS = (".jsonl", ".csv")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from blipcore.evaluation.decoding import STRATEGY_PRESETS

    cap = subparsers.add_parser(
        "caption", help="caption image files and folders with a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Caption images with a checkpoint of a run. Each PATH is an image file (tried whatever its\n"
            f"extension) or a folder, which gives its files named {' '.join('*' + e for e in IMAGE_EXTENSIONS)}\n"
            "(any case), sorted; subfolders only with --recursive.\n\n"
            "Every readable image is captioned; an unreadable one (corrupt, truncated, not an image) is\n"
            "reported on stderr with the reason and the others are still captioned.\n\n"
            "stdout: one line per captioned image, FILE<TAB>CAPTION (no header line).\n"
            "--out FILE.jsonl: one JSON object per image, {\"file\", \"caption\"} or {\"file\", \"error\"}.\n"
            "--out FILE.csv: columns file, caption, error (one of the last two empty).\n\n"
            "exit status: 0 every image captioned; 3 some unreadable (the others captioned);\n"
            "2 bad arguments: a PATH that is neither file nor folder, no images found at all, an --out\n"
            "extension other than .jsonl or .csv, no such run or checkpoint.\n\n"
            "example:  python -m train caption --run-dir runs/demo --epoch last --strategy beam photos/ \\\n"
            "              --out captions.csv"
        ),
    )
    add_run_dir_argument(cap, help="the run whose checkpoint captions, e.g. runs/demo")
    add_epoch_argument(cap, many=False)
    cap.add_argument("--strategy", default="beam", choices=list(STRATEGY_PRESETS), metavar="STRATEGY",
                     help=f"decoding strategy (default beam; known: {', '.join(STRATEGY_PRESETS)})")
    add_device_argument(cap, "captions")
    cap.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                     help="images captioned at once (default 16); a progress bar shows when there are several batches")
    cap.add_argument("--recursive", action="store_true", help="also take images from the subfolders of a folder")
    cap.add_argument("--out", metavar="FILE", help="also write the results to FILE.jsonl or FILE.csv (atomically)")
    cap.add_argument("images", nargs="+", metavar="PATH", help="image files and folders of images")
    cap.set_defaults(func=run)
    return cap


@dataclass
class CaptionResult:
    """One file given to `caption`: its caption, or why it could not be read (then caption is None)."""

    file: str
    caption: str | None = None
    error: str | None = None


def images_to_caption(paths: list[str], recursive: bool) -> list[Path]:
    """The files to caption, in order and each once: a file as given (whatever its extension: it is tried),
    a folder's files with an image extension, sorted (with `recursive`, those of its subfolders too).
    ValueError for a path that is neither a file nor a folder, or when no image is found at all."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            children = path.rglob("*") if recursive else path.iterdir()
            found += sorted(c for c in children if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{arg}: no such file or folder")
    if not found:
        raise ValueError(f"no images in {', '.join(paths)} (a folder gives its files named "
                         f"{' '.join('*' + e for e in IMAGE_EXTENSIONS)}"
                         f"{', subfolders included' if recursive else '; --recursive to search subfolders'})")
    return list(dict.fromkeys(found))


def caption_file_format(out: str | None) -> str | None:
    """The format (a CAPTION_OUT_FORMATS extension) of `--out`, checked before any work; ValueError otherwise."""
    if out is None:
        return None
    suffix = Path(out).suffix.lower()
    if suffix not in CAPTION_OUT_FORMATS:
        raise ValueError(f"--out {out}: unknown format {suffix or '(no extension)'!r}; "
                         f"use {' or '.join(CAPTION_OUT_FORMATS)}")
    return suffix


def caption_files_bytes(results: list[CaptionResult], suffix: str) -> bytes:
    """The results as .jsonl (one object a file: file + caption, or file + error) or .csv (file, caption, error)."""
    if suffix == ".jsonl":
        lines = (json.dumps({k: v for k, v in asdict(r).items() if v is not None}, ensure_ascii=False) for r in results)
        return "".join(line + "\n" for line in lines).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "caption", "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    return buffer.getvalue().encode()


def _caption_batch(model, transform, batch: list[CaptionResult], device: str, strategy: str) -> None:
    """Caption the readable images of `batch` in place; an unreadable one gets its error (and a line on stderr)."""
    import torch
    from tqdm.auto import tqdm

    from blipcore.data import ImageLoadError, load_image
    from blipcore.evaluation.decoding import generate

    readable, images = [], []
    for result in batch:
        try:
            images.append(transform(load_image(result.file)))
            readable.append(result)
        except ImageLoadError as err:  # reported, and the others are still captioned
            result.error = str(err).removeprefix(f"{result.file}: ")
            tqdm.write(f"error: {result.file}: {result.error}", file=sys.stderr)
    if images:
        captions = generate(model, torch.stack(images).to(device), strategy)
        for result, caption in zip(readable, captions, strict=True):
            result.caption = caption.text


def run(args: argparse.Namespace) -> int:
    """Caption every readable image of the files and folders given; exit 3 when some could not be read."""
    from tqdm.auto import tqdm

    from blipcore.data import build_transform
    from blipcore.io import atomic_write_bytes
    from blipcore.runs.rundir import RunDir

    out_format = caption_file_format(args.out)
    files = images_to_caption(args.images, args.recursive)
    device = resolve_device(args.device)
    run_dir = RunDir(args.run_dir)
    model, cfg, ckpt = run_dir.load_model(run_epoch(args.epoch), device=device)
    transform = build_transform(cfg.model.image_size, train=False)

    results = [CaptionResult(str(path)) for path in files]
    batches = [results[i:i + args.batch_size] for i in range(0, len(results), args.batch_size)]
    for batch in tqdm(batches, desc="caption", unit="batch", disable=len(batches) < 2, file=sys.stderr):
        _caption_batch(model, transform, batch, device, args.strategy)

    for result in results:
        if result.caption is not None:
            print(f"{result.file}\t{result.caption}")
    if out_format is not None:
        atomic_write_bytes(args.out, caption_files_bytes(results, out_format))
    failed = sum(result.error is not None for result in results)
    print(f"(epoch {ckpt.epoch} of {run_dir.path}, strategy {args.strategy}: {len(results) - failed} captioned, "
          f"{failed} unreadable{f'; results in {args.out}' if args.out else ''})", file=sys.stderr)
    return 3 if failed else 0
