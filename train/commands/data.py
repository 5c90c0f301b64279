"""`data`: generate datasets, fetch and convert public ones (shapes, coco, flickr8k, shards, noise, resize), and
build the decoded-image cache (cache)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blipcore.model.config import DataConfig
from train.arguments import (
    add_download_arguments,
    add_resume_arguments,
    add_source_and_out,
    again_with_resume,
    count,
    interrupted,
    positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser(
        "data", help="generate datasets, fetch and convert public ones",
        description="Generate, fetch, convert and derive datasets in COCO caption format (docs/data.md). "
                    "Example: python -m train data shapes --out data/shapes")
    data_sub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for add in (_add_shapes, _add_coco, _add_flickr8k, _add_shards, _add_noise, _add_resize, _add_cache):
        add(data_sub)
    return data


def _add_shapes(subparsers) -> None:
    shapes = subparsers.add_parser("shapes", help="captioned synthetic scenes in COCO caption format",
                                 description="Write generated scenes (shapes, colours, sizes, positions, counts, "
                                             "relations) with five captions each, plus a held-out split of unseen "
                                             "colour-shape combinations, in COCO caption format.")
    shapes.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. data/shapes")
    shapes.add_argument("--n-train", type=count, default=3000, metavar="N", help="training scenes (default 3000)")
    shapes.add_argument("--n-val", type=count, default=300, metavar="N", help="validation scenes (default 300)")
    shapes.add_argument("--n-heldout", type=count, default=300, metavar="N",
                        help="held-out scenes of unseen colour-shape combinations (default 300)")
    shapes.add_argument("--image-size", type=positive_int, default=64, metavar="PX",
                        help="image side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
    shapes.set_defaults(func=run_shapes)


def _add_coco(subparsers) -> None:
    from blipcore.data.prep.coco2017 import OFFICIAL_ANNOTATIONS_URL

    coco = subparsers.add_parser(
        "coco", help="COCO 2017 captions and the first N images, fetched by URL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fetch COCO 2017's caption annotations and the first N train2017 / M val2017 images into a folder\n"
            "that `fit --preset seed --data-root OUT` trains on at once.\n\n"
            "\"First\" is the order of the annotation file's own `images` list: the seed write-up's \"first\n"
            "10,000\" (and the seed preset's data.subset = 10000). The annotations come from\n"
            "annotations_trainval2017.zip: by default its official URL, downloaded once (resumably) into\n"
            "OUT/downloads/. Each image is fetched from its record's coco_url by --workers threads, with retries\n"
            "and backoff, checked to decode, optionally shrunk (--image-size), and written atomically.\n\n"
            "OUT: annotations/captions_{train,val}2017.json (the images that arrived, with their captions),\n"
            "train2017/, val2017/, failed.tsv (url, reason) when some did not arrive, bliplab-data.json (how\n"
            "the folder was made). Run again with --resume to fetch only what is missing or failed.\n\n"
            "exit status: 0 every image arrived; 3 some failed (the dataset is usable; see failed.tsv);\n"
            "2 bad arguments or input: unusable annotations, an OUT that holds something else, a full disk\n"
            "(what was written is kept: --resume continues); 130 interrupted (--resume continues)."
        ),
    )
    coco.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. data/coco2017")
    coco.add_argument("--first", type=count, default=10000, metavar="N",
                      help="the first N train2017 images of the annotation file (default 10000; 0: all 118,287)")
    coco.add_argument("--val-first", type=count, default=1000, metavar="M",
                      help="the first M val2017 images (default 1000; 0: all 5,000)")
    coco.add_argument("--annotations", default=OFFICIAL_ANNOTATIONS_URL, metavar="PATH_OR_URL",
                      help="annotations_trainval2017.zip as a URL or a local file, or a folder holding "
                           "captions_train2017.json and captions_val2017.json (default: the official URL)")
    coco.add_argument("--workers", type=positive_int, default=16, metavar="N",
                      help="images fetched at once (default 16)")
    coco.add_argument("--format", choices=("folder", "shards"), default="folder",
                      help="folder (default): the COCO folder; shards: also WebDataset shards of it in OUT/shards "
                           "(as `data shards` writes them), for data.kind = \"webdataset\"")
    add_download_arguments(coco)
    coco.set_defaults(func=run_coco)


def _add_flickr8k(subparsers) -> None:
    flickr = subparsers.add_parser(
        "flickr8k", help="Flickr8k from the two zips of its distribution",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert the Flickr8k distribution (research use only) into the folder that\n"
            "`fit --preset flickr8k --data-root OUT` trains on at once.\n\n"
            "--images Flickr8k_Dataset.zip holds Flicker8k_Dataset/<name>.jpg (the folder's name is misspelt\n"
            "so); --text Flickr8k_text.zip holds Flickr8k.token.txt (lines <name>.jpg#<0-4><TAB><caption>)\n"
            "and Flickr_8k.{train,dev,test}Images.txt. Either may be an http(s) URL (downloaded once,\n"
            "resumably, into OUT/downloads/).\n\n"
            "OUT: images/, annotations/captions_{train,val}.json (a hash split, about 1 image in 10 in val)\n"
            "and annotations/captions_official_{train,dev,test}.json (the official 6,000 / 1,000 / 1,000\n"
            "split that published results use; flickr8k_official_split on every image record). The two\n"
            "splits cross: never train on one and test on the other.\n\n"
            "Both zips are read and checked before anything is written. exit status: 0 done; 3 some listed\n"
            "images could not be converted (see OUT/failed.tsv); 2 bad arguments or input (a zip without\n"
            "Flickr8k.token.txt, a malformed line, an image listed twice, an OUT that holds something else,\n"
            "a full disk: what was written is kept, --resume continues); 130 interrupted."
        ),
    )
    flickr.add_argument("--images", required=True, metavar="ZIP_OR_URL", help="Flickr8k_Dataset.zip (path or URL)")
    flickr.add_argument("--text", required=True, metavar="ZIP_OR_URL", help="Flickr8k_text.zip (path or URL)")
    flickr.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. data/flickr8k")
    flickr.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="images decoded and written at once (default: the CPU count, at most 8)")
    add_download_arguments(flickr)
    flickr.set_defaults(func=run_flickr8k)


def _add_shards(subparsers) -> None:
    shards = subparsers.add_parser(
        "shards", help="WebDataset tar shards of a COCO-caption-format folder, for streaming",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write the train split of a COCO-caption-format folder (what `data coco` or `data flickr8k` writes:\n"
            "annotations/captions_train2017.json + train2017/, or annotations/captions_train.json + images/)\n"
            "as WebDataset tar shards, for\n"
            "`fit --set data.kind=webdataset --data-root OUT`: every DataLoader worker and DDP rank streams its\n"
            "own shards, from local disk or, with --set data.train_shards=URL_PATTERN, object storage.\n\n"
            "OUT: train-000000.tar ... (<id>.jpg + <id>.json with the captions, --shard-size images each),\n"
            "annotations/captions_{train,val}.json, val/ (the val images as files: evaluation and the\n"
            "dashboard read them), train/ (the first --train-files train images as files, for the evaluation's\n"
            "nearest-neighbour row), shards.json (the shards and their image counts).\n\n"
            "exit status: 0 done; 3 some image files could not be read (left out, see OUT/failed.tsv);\n"
            "2 bad arguments or input (what was written is kept: --resume continues)."
        ),
    )
    add_source_and_out(shards, "output folder, e.g. data/flickr8k-shards", out_metavar="DIR")
    shards.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                        help="images a shard (default 1000: ~100-200 MB of COCO photos). Every DDP rank x DataLoader "
                             "worker needs at least one shard")
    shards.add_argument("--train-files", type=count, default=1000, metavar="N",
                        help="the first N train images also written as files (default 1000, what the evaluation's "
                             "nearest-neighbour row reads)")
    shards.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="shards written at once (default: the CPU count, at most 8)")
    add_resume_arguments(shards, "write only the shards that are missing",
                          "start again in an OUT that holds something")
    shards.set_defaults(func=run_shards)


def _add_noise(subparsers) -> None:
    noise = subparsers.add_parser(
        "noise", help="plant known noise: replace a fraction of the training captions with other images' captions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Copy a COCO-caption-format dataset's annotations into OUT, replacing --fraction of the training\n"
            "captions with captions of other, randomly chosen images (as web alt-text is often unrelated to its\n"
            "image). Images and the other entries are linked, not copied; the val and test annotations are\n"
            "copied unchanged. OUT/noise.jsonl says, for every training caption, whether it was replaced and\n"
            "what it said before: CapFilt's filter is scored against it.\n\n"
            "--clean-images N keeps a clean subset, the part BLIP's human-annotated captions (COCO) play beside\n"
            "its web pairs: N training images, drawn with --seed, whose captions the noise neither replaces nor\n"
            "lends to another image (\"clean\": true in noise.jsonl); the --fraction planted captions all fall\n"
            "among the other images'. Their own annotation file, annotations/captions_clean.json beside the\n"
            "training file, is what a captioner and a filter are fine-tuned on (fit --init RUN --set\n"
            "data.train_annotations=annotations/captions_clean.json); `capfilt` keeps their captions as they are.\n\n"
            "example:  python -m train data noise --from ../shared/data/flickr8k --out data/flickr8k-noisy \\\n"
            "              --fraction 0.3 --train-annotations annotations/captions_official_train.json \\\n"
            "              --clean-images 1000"
        ),
    )
    add_source_and_out(noise, "the noisy dataset's folder")
    noise.add_argument("--fraction", type=float, required=True,
                       help="share of the training captions to replace, in [0, 1)")
    noise.add_argument("--seed", type=int, default=0, help="which captions are replaced, and by which (default 0)")
    noise.add_argument("--train-annotations", default=DataConfig().train_annotations, metavar="FILE",
                       help="the training captions, relative to DIR (default %(default)s; Flickr8k's official "
                            "split: annotations/captions_official_train.json)")
    noise.add_argument("--clean-images", type=count, default=0, metavar="N",
                       help="training images whose captions stay clean, the human-annotated share a captioner "
                            "and a filter are fine-tuned on (default 0: none). On Flickr8k's 6,000, "
                            "studies/capfilt.toml keeps 1,000: BLIP's share (COCO's 113K of its 14M images, 0.8%%) "
                            "would be 48 images, 240 captions, each seen 80 times by the 300-step fine-tune at batch "
                            "64; 1,000 images give 5,000 captions, seen ~4 times, near BLIP's 5-6 fine-tuning epochs "
                            "on COCO, and leave 5,000 images to the noise")
    noise.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in OUT")
    noise.set_defaults(func=run_noise)


def _add_resize(subparsers) -> None:
    from blipcore.data.prep.resized import DEFAULT_QUALITY, DEFAULT_WORKERS, MAX_QUALITY, MIN_SIZE

    resize = subparsers.add_parser(
        "resize", help="a copy of a dataset folder with every image shrunk: a pre-resized image cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Copy a COCO-caption-format folder into OUT with every image shrunk so that its shorter side is\n"
            "--size pixels (aspect kept, Lanczos; images already that small are copied as they are, never\n"
            "enlarged), under the same path and file name, in the format its extension names (.jpg / .jpeg\n"
            "JPEG and .webp WebP at --quality, .png, .bmp), RGB. Annotations and every other file are copied\n"
            "unchanged; links to folders (the image folder of `data noise`'s output) are followed. Training then\n"
            "decodes small images instead of full-size ones (the CPU preset's 96 px model: --size 128 leaves room\n"
            "for its random crop), and the copy travels light. Not copied: DIR's bliplab-data.json (OUT gets its\n"
            "own) and downloads/.\n\n"
            "An image that does not decode is copied unchanged and named in the summary (training skips it).\n"
            "exit status: 0 done (undecodable images included); 2 bad arguments or input (--size, --quality, an\n"
            "OUT inside DIR or one that holds something else, a full disk: what was written is kept, --resume\n"
            "continues); 130 interrupted (--resume continues).\n\n"
            "example:  python -m train data resize --from ../shared/data/flickr8k --out data/flickr8k-128 \\\n"
            "              --size 128"
        ),
    )
    add_source_and_out(resize, "the resized copy's folder (outside DIR)")
    resize.add_argument("--size", type=int, required=True, metavar="PX",
                        help=f"every image's shorter side afterwards, in pixels (at least {MIN_SIZE})")
    resize.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                        help=f"JPEG and WebP quality, 1-{MAX_QUALITY} (default %(default)s)")
    resize.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, metavar="N",
                        help="files processed at once (default %(default)s threads: a file mostly waits on the "
                             "disk)")
    add_resume_arguments(resize, "continue an interrupted run into OUT (same settings): write only the missing files",
                          "start again in an OUT that holds something: deletes what this command writes there")
    resize.set_defaults(func=run_resize)


def _add_cache(subparsers) -> None:
    from blipcore.data.image_cache import BUILD_WORKERS, SCALE

    cache = subparsers.add_parser(
        "cache", help="decode a dataset's training images once into the image cache of data.loader = cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Decode the training images of a COCO-caption-format folder once into the image cache that\n"
            f"`fit --set data.loader=cache` reads (docs/data.md): every image at {SCALE:g}x the model's image size on\n"
            "its shorter side (aspect kept, never enlarged), uint8, in one memory-mapped file, and the\n"
            "captions' token ids beside it. Training builds the cache on first use as well; this command builds\n"
            "it ahead, e.g. before several runs start. It is keyed by the size and the images (paths and file\n"
            "sizes): a built one is reused, another size or dataset gets its own file.\n\n"
            "The training split is read as --preset lays it out (annotation file, image folder, subset; its\n"
            "model's image size and caption length); without --preset, annotations/captions_train.json and\n"
            "images/ with every image, and --size is required.\n\n"
            "example:  python -m train data cache --from ../shared/data/flickr8k --preset flickr8k-cpu\n"
            "          python -m train fit --preset flickr8k-cpu --data-root ../shared/data/flickr8k \\\n"
            "              --set data.loader=cache"
        ),
    )
    cache.add_argument("--from", dest="source", required=True, metavar="DIR", help="a COCO-caption-format folder")
    cache.add_argument("--preset", metavar="NAME", help="the preset (or .toml file) the training runs with")
    cache.add_argument("--size", type=positive_int, metavar="PX",
                       help=f"the model's image size (default: the preset's model.image_size); stored at {SCALE:g}x it")
    cache.add_argument("--train-annotations", metavar="FILE",
                       help="the training captions, relative to DIR (default: the preset's, or "
                            f"{DataConfig().train_annotations})")
    cache.add_argument("--out", metavar="DIR",
                       help="the cache folder (default: the preset's data.cache_dir, or the user's cache folder "
                            "~/.cache/bliplab/images); train with --set data.cache_dir=DIR then")
    cache.add_argument("--workers", type=positive_int, default=BUILD_WORKERS, metavar="N",
                       help="images decoded at once (default: the CPU count, at most 8)")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=run_cache)


# --- handlers ---------------------------------------------------------------------------------
def run_shapes(args: argparse.Namespace) -> int:
    from blipcore.data import generate_shapes

    generate_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_heldout=args.n_heldout,
                    image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_heldout} train/val/heldout scenes to {args.out}")
    return 0


def http_policy(args: argparse.Namespace):
    from blipcore.data.prep.fetch import HttpPolicy

    return HttpPolicy(timeout=args.timeout, retries=args.retries, backoff=args.backoff)


def run_coco(args: argparse.Namespace) -> int:
    """Fetch COCO 2017 captions and images; exit 0 when every image arrived, 3 when some did not."""
    from blipcore.data.prep.coco2017 import fetch_coco

    try:
        report = fetch_coco(args.out, first=args.first, val_first=args.val_first, annotations=args.annotations,
                            image_size=args.image_size, workers=args.workers, policy=http_policy(args),
                            resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        return interrupted(args, "every image written so far is complete and kept")
    print(report.summary())
    if report.failures:
        print(f"the dataset is usable as it is; to try the failed images again:  {again_with_resume(args)}")
    if args.format == "shards":  # written afresh from the folder: a resume may have added images anywhere
        from blipcore.data.prep.shards import write_shards

        shards = write_shards(args.out, Path(args.out) / "shards", overwrite=True, progress=not args.no_progress)
        print(shards.summary())
        print(f"train on them with:  --set data.kind=webdataset --data-root {shards.out}")
    return 3 if report.failures else 0


def run_flickr8k(args: argparse.Namespace) -> int:
    """Convert the two Flickr8k zips; exit 0 when every listed image was converted, 3 when some were not."""
    from blipcore.data.prep.flickr8k import convert_flickr8k

    try:
        report = convert_flickr8k(args.images, args.text, args.out, image_size=args.image_size, workers=args.workers,
                                  policy=http_policy(args), resume=args.resume, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    except KeyboardInterrupt:
        return interrupted(args, "every image written so far is complete and kept")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(report.summary())
    return 3 if report.failures else 0


def run_shards(args: argparse.Namespace) -> int:
    """Write a COCO-caption-format folder's train split as WebDataset shards; exit 3 when some files were unreadable."""
    from blipcore.data.prep.shards import write_shards

    report = write_shards(args.source, args.out, shard_size=args.shard_size, train_files=args.train_files,
                          workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(report.summary())
    print(f"train on them with:  --set data.kind=webdataset --data-root {report.out}")
    return 3 if report.failures else 0


def run_noise(args: argparse.Namespace) -> int:
    """Plant noise in a dataset's training captions (a derived folder + noise.jsonl)."""
    from blipcore.data.prep.noise import plant_noise

    report = plant_noise(args.source, args.out, args.fraction, seed=args.seed,
                         train_annotations=args.train_annotations, overwrite=args.overwrite,
                         clean_images=args.clean_images)
    print(report.summary())
    print(f"train on it with:  --data-root {report.out}")
    if report.clean_file:
        print(f"fine-tune on the clean subset with:  --data-root {report.out} --set "
              f"data.train_annotations={report.clean_file}")
    return 0


def run_resize(args: argparse.Namespace) -> int:
    """Copy a dataset folder with every image shrunk; exit 0 even when some images could not be (the summary
    names them: they are copied unchanged)."""
    from blipcore.data.prep.resized import resize_dataset

    try:
        report = resize_dataset(args.source, args.out, args.size, quality=args.quality, workers=args.workers,
                                resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        return interrupted(args, "every file written so far is complete and kept")
    print(report.summary())
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Build (or find) the image cache and caption tokens of a folder's training split."""
    from blipcore.data.image_cache import build_cache
    from blipcore.model.config import BlipConfig, load_preset

    if args.preset is None and args.size is None:
        raise ValueError("data cache needs the model's image size: pass --size PX or --preset NAME")
    cfg = load_preset(args.preset) if args.preset else BlipConfig()
    overrides = {"data.kind": "coco", "data.root": str(Path(args.source).resolve())}
    if args.size:
        overrides["model.image_size"] = args.size
    if args.train_annotations:
        overrides["data.train_annotations"] = args.train_annotations
    out = str(Path(args.out).resolve()) if args.out else ""
    if out:  # absolute: a relative data.cache_dir is taken relative to the project checkout
        overrides["data.cache_dir"] = out
    try:
        report = build_cache(cfg.override(overrides), workers=args.workers, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is read as a cache; run the same command again", file=sys.stderr)
        return 130
    print(report)
    print("train with:  --set data.loader=cache" + (f" --set data.cache_dir={out}" if out else ""))
    return 0
