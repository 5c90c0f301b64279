"""`python -m train`: train, evaluate, caption, inspect runs, generate, fetch and convert datasets.

    python -m train fit --preset demo --run-dir runs/demo
    python -m train eval --run-dir runs/demo --epoch all --strategies greedy,beam,nucleus
    python -m train eval --run-dir runs/gpu --split test --strategies greedy,beam --captions-out captions
    python -m train score captions/*.json --annotations data/flickr8k/annotations/captions_official_test.json
    python -m train caption --run-dir runs/demo --strategy beam photo.jpg
    python -m train caption --run-dir runs/demo photos/ --out captions.csv
    python -m train info runs/demo
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
import csv
import io
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blipcore.model.config import BlipConfig, DataConfig, available_presets, load_preset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what `caption` takes from a folder
CAPTION_OUT_FORMATS = (".jsonl", ".csv")


def build_config(args: argparse.Namespace) -> BlipConfig:
    """The preset of `--preset` (without one: with --init, the init run's config, else demo) with --init,
    --epochs, --max-steps, --device, --data-root and --set applied."""
    init = getattr(args, "init", None)
    if args.preset is None and init:
        from blipcore.runs.rundir import RunDir, init_checkpoint, parse_run_spec

        init_checkpoint(init)  # a missing run or checkpoint named as such
        cfg = RunDir(parse_run_spec(init)[0]).config()
    else:
        cfg = load_preset(args.preset or "demo")
    sets = [f"train.init={init}"] if init else []
    sets += list(args.set or [])
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        sets.append(f"train.max_steps={args.max_steps}")
    if args.device is not None:
        sets.append(f"train.device={args.device}")
    if args.data_root is not None:
        sets.append(f"data.root={Path(args.data_root).resolve()}")
    return cfg.override_strings(sets) if sets else cfg


# --- subcommands -------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    """Train (or with --resume continue) a run; one summary line, printed by the first torchrun rank only."""
    from blipcore.runs.rundir import RunDir, parse_run_spec
    from blipcore.training.trainer import Trainer

    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.init and not args.preset:
        run_dir = Path(f"runs/{parse_run_spec(args.init)[0].name}-init")
    else:
        run_dir = Path(f"runs/{Path(args.preset or 'demo').stem}")
    if args.resume and args.init:
        raise ValueError("--init starts a new run from a checkpoint's weights; --resume continues one: not both")
    if args.resume:
        cfg = RunDir(run_dir).config()
        given = (("epochs", args.epochs), ("max_steps", args.max_steps), ("device", args.device))
        sets = list(args.set or []) + [f"train.{k}={v}" for k, v in given if v is not None]
        if args.data_root is not None:  # the data moved (another machine, another disk): same run, new folder
            sets.append(f"data.root={Path(args.data_root).resolve()}")
        cfg = cfg.override_strings(sets) if sets else cfg
    else:
        cfg = build_config(args)
    summary = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).fit()
    if summary:  # empty on every torchrun rank but the first: one summary line per run, not one per process
        print(f"{summary.get('status', 'done')}: {summary.get('step')} steps, {summary.get('epoch')} epochs in "
              f"{summary.get('train_seconds')} s -> {run_dir}")
        if summary.get("status") == "interrupted":
            print(f"resume with: python -m train fit --run-dir {run_dir} --resume")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """A run's config, status, progress, best headline metrics and last logged line."""
    from blipcore.runs.rundir import RunDir

    run = RunDir(args.run_dir)
    info = run.read_info()
    checkpoints = run.checkpoints()
    if args.json:
        print(json.dumps({"info": info, "epochs": [c.epoch for c in checkpoints]}, indent=2))
        return 0
    cfg = info.get("config", {})
    m = cfg.get("model", {})
    print(f"run        {run.path}")
    print(f"status     {info.get('status')}" + (f"  ({info['error']})" if info.get("error") else ""))
    print(f"preset     {info.get('preset')}   created {info.get('created_at')}   updated {info.get('updated_at')}")
    print(f"device     {info.get('device', {}).get('type')} {info.get('device', {}).get('name', '')}   "
          f"git {str(info.get('git_revision'))[:10]}")
    for resumed in info.get("resumes", []):  # the code and machine that continued it
        print(f"resumed    at step {resumed.get('step')} on {resumed.get('at')}: "
              f"{resumed.get('device', {}).get('cpu_model') or resumed.get('device', {}).get('name')}   "
              f"git {str(resumed.get('git_revision'))[:10]}")
    print(f"model      ViT {m.get('image_size')}/{m.get('patch_size')} width {m.get('vision_width')} depth "
          f"{m.get('vision_depth')}; text width {m.get('text_width')} enc {m.get('text_encoder_depth')} dec "
          f"{m.get('text_decoder_depth')}; {info.get('parameters', 0):,} parameters")
    print(f"losses     itc {m.get('itc_weight')}  lm {m.get('lm_weight')}  itm {m.get('itm_weight')}")
    data = cfg.get("data", {})
    print(f"data       {data.get('kind')} {data.get('root')} ({info.get('train_items')} train items)")
    epochs = ", ".join(str(c.epoch) for c in checkpoints) or "none yet"
    print(f"progress   {info.get('steps_done', 0)}/{info.get('total_steps')} steps, epochs {epochs}"
          + (f", {info['train_seconds']} s" if info.get("train_seconds") else ""))
    best = _headline_best(info.get("best", {}))
    if best:
        print(f"best       {best}")
    last = run.read_metrics()[-1:] if run.metrics_file.exists() else []
    if last:
        print(f"last line  {json.dumps(last[0], sort_keys=True)[:200]}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """What went wrong in runs or study records: one block per run, a line per finding in order of onset; exit 1
    when a finding reaches --fail-on, 2 when a folder is not a run or cannot be read."""
    from blipcore.evaluation.diagnosis import committed_records, diagnose_record, diagnose_run, diagnose_runs
    from blipcore.runs.rundir import RunDir, RunError, list_runs

    records = committed_records()
    if args.run_dir:
        run = RunDir(args.run_dir)
        if not run.exists() and Path(args.run_dir).is_dir() and list_runs(args.run_dir):
            raise RunError(f"{args.run_dir}: not a run folder but a folder of runs; diagnose them with --runs-dir")
        found = [diagnose_run(run, records)]
    elif args.runs_dir:
        if not Path(args.runs_dir).is_dir():
            raise RunError(f"{args.runs_dir}: no such folder")
        found = diagnose_runs(args.runs_dir, records)
        if not found:
            raise RunError(f"{args.runs_dir}: holds no run folder (one with a run.json), nor a study folder of them")
    else:
        found = [diagnose_record(path, records) for path in args.record]
    if args.json:
        print(json.dumps([diagnosis.to_dict() for diagnosis in found], indent=2))
    else:
        print("\n\n".join(diagnosis.text() for diagnosis in found))
    unreadable = [diagnosis for diagnosis in found if diagnosis.error]
    for diagnosis in unreadable:
        print(f"error: {diagnosis.error}", file=sys.stderr)
    if unreadable:
        return 2
    return 1 if any(diagnosis.reaches(args.fail_on) for diagnosis in found) else 0


def _headline_best(best: dict[str, Any]) -> str:
    """run.json's best values of the headline metrics (the registry's `headline` flag), as `key=value@epoch`."""
    from blipcore.evaluation.metrics import metric

    shown = []
    for key, entry in sorted(best.items()):
        declared = metric(key)
        if declared is not None and declared.headline and isinstance(entry, dict):
            shown.append(f"{key}={declared.format(entry.get('value'))}@{entry.get('epoch')}")
    return "  ".join(shown)


def _epochs_to_evaluate(run, spec: str | None) -> list[int]:
    available = run.epochs()
    if not available:
        raise run.no_checkpoint_error()
    if spec in (None, "last"):
        return [available[-1]]
    if spec == "all":
        return available
    return [int(e) for e in spec.split(",")]


def cmd_eval(args: argparse.Namespace) -> int:
    from blipcore.evaluation import metrics
    from blipcore.evaluation.evaluator import CheckpointEvaluator, summary_metrics
    from blipcore.runs.rundir import RunDir

    run = RunDir(args.run_dir)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    other = None
    if args.annotations:  # another dataset, evaluated as a test split under its own name
        root = Path(args.data_root or ".")
        other = (root / args.annotations, root / args.image_folder)
        for path, what in ((other[0], "--annotations"), (other[1], "--image-folder")):
            if not path.exists():
                raise ValueError(f"{what} {path}: no such {'file' if what == '--annotations' else 'folder'}")
    elif args.split not in ("val", "test") or args.data_root:
        raise ValueError("--data-root and a --split other than val or test go with --annotations FILE "
                         "(evaluate on another dataset)")
    evaluator = CheckpointEvaluator(run, args.split, args.device, other_data=other)
    for epoch in _epochs_to_evaluate(run, args.epoch):
        result = evaluator.evaluate(epoch, strategies, args.images, meteor=not args.no_meteor,
                                    captions_dir=args.captions_out)
        rows = {name: {**entry["metrics"], "notes": entry["notes"]}
                for name, entry in result.get("strategies", {}).items()}
        for name, reference in result.get("reference_rows", {}).items():  # what learning nothing / retrieval score
            rows[f"({name})"] = {**reference["metrics"], "notes": reference.get("notes", [])}
        print(f"\nepoch {epoch}, {args.split} ({result['num_images']} images) -> {run.eval_path(epoch, args.split)}")
        print(metrics.format_metrics_table(rows))
        retrieval = result.get("retrieval")
        if retrieval:
            print("retrieval  " + "  ".join(f"{k}={v:.1f}" for k, v in retrieval.items()))
        matching = result.get("matching")
        if matching:
            print("matching   " + "  ".join(f"{k}={v:.3f}" for k, v in matching.items()))
        print("summary    " + json.dumps({k: round(v, 4) for k, v in summary_metrics(result).items()}))
        print("seconds    " + "  ".join(f"{k}={v:.1f}" for k, v in result["seconds"].items()))
        if args.captions_out:
            print(f"captions   -> {args.captions_out}/epoch_{epoch:03d}.{args.split}.<strategy>.json")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from blipcore.evaluation import metrics
    from blipcore.evaluation.scoring import score_results
    from blipcore.io import atomic_write_json

    scored = score_results(args.results, args.annotations, args.train_annotations, meteor=not args.no_meteor)
    print(metrics.format_metrics_table({name: {**row["metrics"], "notes": row["notes"]}
                                        for name, row in scored.items()}))
    if args.out:
        atomic_write_json(args.out, {"annotations": str(args.annotations), "results": scored})
        print(f"-> {args.out}")
    return 0


@dataclass
class CaptionResult:
    """One file given to `caption`: its caption, or why it could not be read (then caption is None)."""

    file: str
    caption: str | None = None
    error: str | None = None


def _images_to_caption(paths: list[str], recursive: bool) -> list[Path]:
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


def _caption_file_format(out: str | None) -> str | None:
    """The format (a CAPTION_OUT_FORMATS extension) of `--out`, checked before any work; ValueError otherwise."""
    if out is None:
        return None
    suffix = Path(out).suffix.lower()
    if suffix not in CAPTION_OUT_FORMATS:
        raise ValueError(f"--out {out}: unknown format {suffix or '(no extension)'!r}; "
                         f"use {' or '.join(CAPTION_OUT_FORMATS)}")
    return suffix


def _caption_files_bytes(results: list[CaptionResult], suffix: str) -> bytes:
    """The results as .jsonl (one object a file: file + caption, or file + error) or .csv (file, caption, error)."""
    if suffix == ".jsonl":
        lines = (json.dumps({k: v for k, v in asdict(r).items() if v is not None}, ensure_ascii=False) for r in results)
        return "".join(line + "\n" for line in lines).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "caption", "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    return buffer.getvalue().encode()


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption every readable image of the files and folders given; exit 3 when some could not be read."""
    import torch
    from tqdm.auto import tqdm

    from blipcore.data import ImageLoadError, build_transform, load_image
    from blipcore.evaluation.decoding import generate
    from blipcore.io import atomic_write_bytes
    from blipcore.runs.rundir import RunDir

    out_format = _caption_file_format(args.out)
    files = _images_to_caption(args.images, args.recursive)
    run = RunDir(args.run_dir)
    model, cfg, ckpt = run.load_model(args.epoch, device=args.device)
    transform = build_transform(cfg.model.image_size, train=False)

    results = [CaptionResult(str(path)) for path in files]
    batches = [results[i:i + args.batch_size] for i in range(0, len(results), args.batch_size)]
    for batch in tqdm(batches, desc="caption", unit="batch", disable=len(batches) < 2, file=sys.stderr):
        readable, images = [], []
        for result in batch:
            try:
                images.append(transform(load_image(result.file)))
                readable.append(result)
            except ImageLoadError as err:  # reported, and the others are still captioned
                result.error = str(err).removeprefix(f"{result.file}: ")
                tqdm.write(f"error: {result.file}: {result.error}", file=sys.stderr)
        if images:
            captions = generate(model, torch.stack(images).to(args.device), args.strategy)
            for result, caption in zip(readable, captions, strict=True):
                result.caption = caption.text

    for result in results:
        if result.caption is not None:
            print(f"{result.file}\t{result.caption}")
    if out_format is not None:
        atomic_write_bytes(args.out, _caption_files_bytes(results, out_format))
    failed = sum(result.error is not None for result in results)
    print(f"(epoch {ckpt.epoch} of {run.path}, strategy {args.strategy}: {len(results) - failed} captioned, "
          f"{failed} unreadable{f'; results in {args.out}' if args.out else ''})", file=sys.stderr)
    return 3 if failed else 0


def cmd_study(args: argparse.Namespace) -> int:
    """Run a study plan into its folder (skipping what is done, resuming what is not) and print its table."""
    from blipcore.experiments.study import StudyStopped, load_plan, run_study, save_plan_copy, selection
    from blipcore.training.trainer import Trainer

    plan = load_plan(args.plan)
    if args.report is not None:
        return _write_study_report(plan, args)
    if args.data_root:
        plan.overrides["data.root"] = str(Path(args.data_root).resolve())
    selection(plan, args.only, args.seeds)  # a bad --only or --seeds is refused before anything is written
    out = Path(args.out or f"runs/study-{plan.name}")
    save_plan_copy(Path(args.plan), out)

    def train(cfg, folder: Path, resume: bool) -> dict:
        return Trainer(cfg, folder, resume=resume, progress=not args.no_progress).fit()

    def command(words: list[str]) -> int:
        return main(_command_stage_words(words, progress=not args.no_progress))

    try:
        table = run_study(plan, out, train, command, log=lambda line: print(f"[study] {line}", file=sys.stderr),
                          only=args.only, seeds=args.seeds, results=args.results)
    except StudyStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    print((out / "study.md").read_text(), end="")
    print(f"{len(table['rows'])} rows -> {out / 'study.json'}, {out / 'study.csv'}, {out / 'study.md'}"
          + (f"; results recorded in {args.results}" if args.results else ""))
    return 0


def _write_study_report(plan: Any, args: argparse.Namespace) -> int:
    """`study PLAN --results DIR --report FILE`: the table of the records alone, written to FILE; trains nothing."""
    from blipcore.experiments.study import records_report
    from blipcore.io import atomic_write_bytes

    if args.results is None or not args.results.is_dir():
        print(f"error: --report makes the table of the records in --results DIR; "
              f"{'give --results' if args.results is None else f'{args.results} is not a folder'}", file=sys.stderr)
        return 2
    command = f"python -m train study {args.plan} --results {args.results} --report {args.report}"
    atomic_write_bytes(args.report, records_report(plan, args.results, command).encode())
    print(f"{args.report}: the table of {plan.name}'s records in {args.results}")
    return 0


def _command_stage_words(words: list[str], progress: bool) -> list[str]:
    """A study's command stage as it runs: with --no-progress when the study has it and the command takes it (a
    progress bar redrawn in a log file is thousands of lines of noise)."""
    if progress or "--no-progress" in words:
        return words
    takes_it = hasattr(build_parser().parse_args(words), "no_progress")
    return [*words, "--no-progress"] if takes_it else words


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from blipcore.data import generate_shapes

    generate_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_heldout=args.n_heldout,
                    image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_heldout} train/val/heldout scenes to {args.out}")
    return 0


def _again_with_resume(args: argparse.Namespace) -> str:
    """The command line the user gave, with --resume in place of --overwrite: how to continue a data command."""
    words = [word for word in args.argv if word not in ("--overwrite", "--resume")]
    return f"{_program_name()} {shlex.join(words)} --resume"


def _interrupted(args: argparse.Namespace, kept: str) -> int:
    """Say what an interrupted data command kept (`kept`) and the command line that continues it; exit status 130."""
    print(f"interrupted: {kept}; continue with:\n  {_again_with_resume(args)}", file=sys.stderr)
    return 130


def _http_policy(args: argparse.Namespace):
    from blipcore.data.prep.fetch import HttpPolicy

    return HttpPolicy(timeout=args.timeout, retries=args.retries, backoff=args.backoff)


def cmd_data_coco(args: argparse.Namespace) -> int:
    """Fetch COCO 2017 captions and images; exit 0 when every image arrived, 3 when some did not."""
    from blipcore.data.prep.coco2017 import fetch_coco

    try:
        report = fetch_coco(args.out, first=args.first, val_first=args.val_first, annotations=args.annotations,
                            image_size=args.image_size, workers=args.workers, policy=_http_policy(args),
                            resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args, "every image written so far is complete and kept")
    print(report.summary())
    if report.failures:
        print(f"the dataset is usable as it is; to try the failed images again:  {_again_with_resume(args)}")
    if args.format == "shards":  # written afresh from the folder: a resume may have added images anywhere
        from blipcore.data.prep.shards import write_shards

        shards = write_shards(args.out, Path(args.out) / "shards", overwrite=True, progress=not args.no_progress)
        print(shards.summary())
        print(f"train on them with:  --set data.kind=webdataset --data-root {shards.out}")
    return 3 if report.failures else 0


def cmd_data_flickr8k(args: argparse.Namespace) -> int:
    """Convert the two Flickr8k zips; exit 0 when every listed image was converted, 3 when some were not."""
    from blipcore.data.prep.flickr8k import convert_flickr8k

    try:
        report = convert_flickr8k(args.images, args.text, args.out, image_size=args.image_size, workers=args.workers,
                                  policy=_http_policy(args), resume=args.resume, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args, "every image written so far is complete and kept")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(report.summary())
    return 3 if report.failures else 0


def cmd_data_shards(args: argparse.Namespace) -> int:
    """Write a COCO-caption-format folder's train split as WebDataset shards; exit 3 when some files were unreadable."""
    from blipcore.data.prep.shards import write_shards

    report = write_shards(args.source, args.out, shard_size=args.shard_size, train_files=args.train_files,
                          workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(report.summary())
    print(f"train on them with:  --set data.kind=webdataset --data-root {report.out}")
    return 3 if report.failures else 0


def cmd_data_noise(args: argparse.Namespace) -> int:
    """Plant noise in a dataset's training captions (a derived folder + noise.jsonl)."""
    from blipcore.data.prep.noise import plant_noise

    report = plant_noise(args.source, args.out, args.fraction, seed=args.seed,
                         train_annotations=args.train_annotations, overwrite=args.overwrite)
    print(report.summary())
    print(f"train on it with:  --data-root {report.out}")
    return 0


def cmd_data_resize(args: argparse.Namespace) -> int:
    """Copy a dataset folder with every image shrunk; exit 0 even when some images could not be (the summary
    names them: they are copied unchanged)."""
    from blipcore.data.prep.resized import resize_dataset

    try:
        report = resize_dataset(args.source, args.out, args.size, quality=args.quality, workers=args.workers,
                                resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args, "every file written so far is complete and kept")
    print(report.summary())
    return 0


def cmd_capfilt(args: argparse.Namespace) -> int:
    """Caption and filter a dataset's training images into a bootstrapped dataset."""
    from blipcore.experiments.capfilt import CapfiltSettings, run_capfilt

    settings = CapfiltSettings(synthetic_per_image=args.synthetic, decoding=args.decoding, score=args.score,
                               threshold=args.threshold, keep_fraction=args.keep_fraction,
                               batch_size=args.batch_size, seed=args.seed)
    try:
        report = run_capfilt(args.captioner, args.filter, args.data, args.out, settings,
                             train_annotations=args.train_annotations, train_images=args.train_images,
                             device=args.device, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args, "the batches scored so far are kept")
    print(report.text())
    print(f"train on it with:  --data-root {report.out}")
    return 0


def _program_name() -> str:
    """How the user called us, for usage lines: `python -m train` or the `bliplab` console command."""
    name = Path(sys.argv[0]).name
    return "python -m train" if name in ("__main__.py", "") else name


# --- parser ------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _timeout(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    value = _seconds(text)
    if not value:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _add_source_and_out(parser: argparse.ArgumentParser, out_help: str, out_metavar: str = "DIR2") -> None:
    """--from DIR (a dataset folder) and --out: the data commands that make a folder from another."""
    parser.add_argument("--from", dest="source", required=True, metavar="DIR", help="a COCO-caption-format folder")
    parser.add_argument("--out", required=True, metavar=out_metavar, help=out_help)


def _add_resume_arguments(parser: argparse.ArgumentParser, resume: str, overwrite: str) -> None:
    """--resume or --overwrite (help texts `resume`, `overwrite`), and --no-progress: every command writing a folder."""
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume)
    again.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """--image-size, the HTTP policy, --resume / --overwrite and --no-progress: shared by the data commands."""
    parser.add_argument("--image-size", type=_positive_int, metavar="N",
                        help="shrink every image whose shorter side is longer than N pixels so that side is N "
                             "(aspect kept, JPEG quality 90); smaller images are kept as they are. Default: keep all")
    parser.add_argument("--timeout", type=_timeout, default=30.0, metavar="S",
                        help="seconds to wait for a connection or for the next bytes (default 30)")
    parser.add_argument("--retries", type=_count, default=3, metavar="N",
                        help="retries of a timed-out, dropped or HTTP 5xx/429 request (default 3)")
    parser.add_argument("--backoff", type=_seconds, default=1.0, metavar="S",
                        help="seconds before the first retry, doubled before each next one (default 1)")
    _add_resume_arguments(parser, "continue an earlier run into --out: only what is missing or failed is fetched",
                          "start again in an --out that holds something: deletes what this command writes there "
                          "(nothing else; downloads/ is kept)")


def build_parser() -> argparse.ArgumentParser:
    from blipcore.data.prep.coco2017 import OFFICIAL_ANNOTATIONS_URL
    from blipcore.data.prep.resized import DEFAULT_QUALITY, DEFAULT_WORKERS, MAX_QUALITY, MIN_SIZE
    from blipcore.evaluation.decoding import STRATEGY_PRESETS
    from blipcore.evaluation.metrics import SEVERITIES

    parser = argparse.ArgumentParser(
        prog=_program_name(), description="Train and inspect BLIP models from random initialisation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    strategies = ", ".join(STRATEGY_PRESETS)

    fit = sub.add_parser("fit", help="train a model into a run directory",
                         description="Train a BLIP model from random initialisation into a run directory "
                                     "(run.json, metrics.jsonl, checkpoints/, embeddings/, eval/).")
    fit.add_argument("--preset",
                     help=f"a preset of blipcore/presets/ ({', '.join(available_presets())}; default demo, or with "
                          "--init the init run's own config) or the path of a .toml file in that format")
    fit.add_argument("--init", metavar="RUN[:EPOCH]",
                     help="start from that run's checkpoint (default its newest) instead of random weights: parts "
                          "both models have are copied, the others start fresh (e.g. fine-tune a captioner with "
                          "--set model.itc_weight=0, or a filter with --set model.lm_weight=0 --set "
                          "model.itm_weight=1); a fresh optimizer, schedule and data order")
    fit.add_argument("--run-dir", help="where the run is written (default runs/<preset>, with --init alone "
                                       "runs/<init run>-init)")
    fit.add_argument("--data-root", help="dataset folder in COCO caption format (overrides the preset's data.root; "
                                         "with --resume, the run's own)")
    fit.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override any config value, e.g. --set train.batch_size=16 (repeatable)")
    fit.add_argument("--epochs", type=int, help="number of epochs")
    fit.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA if available")
    fit.add_argument("--resume", action="store_true", help="continue the run in --run-dir from checkpoints/last/")
    fit.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="captioning, collapse and retrieval metrics of checkpoints",
                        description="Evaluate checkpoints of a run with several decoding strategies and write "
                                    "eval/epoch_NNN.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr, collapse metrics, "
                                    "retrieval R@K, sample captions). SPICE is not computed (needs a download).")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--epoch", help="an epoch number, a comma list, 'last' (default) or 'all'")
    ev.add_argument("--strategies", default="greedy,beam,nucleus,repetition-penalty,no-repeat-ngram",
                    help=f"comma-separated decoding strategies (known: {strategies})")
    ev.add_argument("--split", default="val",
                    help="val (default): the split training evaluates on, written to eval/epoch_NNN.json; test: "
                         "the held-out split of data.test_annotations (e.g. Flickr8k's official 1,000 test images), "
                         "every image and all its references, written to eval/epoch_NNN.test.json; with "
                         "--annotations, the name of that evaluation (eval/epoch_NNN.<name>.json, e.g. coco-mini)")
    ev.add_argument("--annotations", metavar="FILE",
                    help="evaluate on another dataset: its COCO-caption file (relative to --data-root), every "
                         "image and all its references, e.g. --data-root ../shared/data/coco-mini --annotations "
                         "annotations/captions_val.json --split coco-mini")
    ev.add_argument("--data-root", metavar="DIR", help="with --annotations: the folder it and --image-folder are in")
    ev.add_argument("--image-folder", default="images", metavar="FOLDER",
                    help="with --annotations: its images, relative to --data-root (default images)")
    ev.add_argument("--images", type=int,
                    help="number of images to caption (default: the run's setting on val, all of test)")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--captions-out", type=Path, metavar="DIR",
                    help="also write every caption of each strategy and of the nearest-neighbour row to DIR, one "
                         "COCO results file each (epoch_NNN.<split>.<name>.json), to score them on another "
                         "machine with `python -m train score` (e.g. from a GPU machine without Java)")
    ev.set_defaults(func=cmd_eval)

    score = sub.add_parser(
        "score", help="score COCO results files (captions written elsewhere) against a caption file",
        description="Score captions written elsewhere (`python -m train eval --captions-out`, or any captioner's "
                    "COCO results file: a JSON list of {\"image_id\", \"caption\"}) against every reference "
                    "caption of a COCO caption file: BLEU-1..4, METEOR, ROUGE-L and CIDEr on PTB-tokenised text "
                    "(Java), the collapse metrics and, with --train-annotations, memorisation. Every image of "
                    "the annotations must have exactly one caption.",
    )
    score.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json")
    score.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                       help="the references: a COCO caption file, e.g. "
                            "../shared/data/flickr8k/annotations/captions_official_test.json")
    score.add_argument("--train-annotations", type=Path, metavar="FILE",
                       help="the training captions, for the share of captions found verbatim among them")
    score.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")
    score.add_argument("--out", type=Path, metavar="FILE", help="also write the scores as JSON")
    score.set_defaults(func=cmd_score)

    cap = sub.add_parser(
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
            "extension other than .jsonl or .csv, no such run or checkpoint."
        ),
    )
    cap.add_argument("--run-dir", required=True, help="the run whose checkpoint captions")
    cap.add_argument("--epoch", type=int, help="epoch checkpoint (default: the newest)")
    cap.add_argument("--strategy", default="beam", choices=list(STRATEGY_PRESETS), metavar="STRATEGY",
                     help=f"decoding strategy (default beam; known: {strategies})")
    cap.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    cap.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                     help="images captioned at once (default 16); a progress bar shows when there are several batches")
    cap.add_argument("--recursive", action="store_true", help="also take images from the subfolders of a folder")
    cap.add_argument("--out", metavar="FILE", help="also write the results to FILE.jsonl or FILE.csv (atomically)")
    cap.add_argument("images", nargs="+", metavar="PATH", help="image files and folders of images")
    cap.set_defaults(func=cmd_caption)

    capfilt = sub.add_parser(
        "capfilt", help="CapFilt: caption the training images, filter every caption, write the bootstrapped data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "BLIP's CapFilt. The captioner writes --synthetic captions per training image of --data (nucleus\n"
            "sampling by default, BLIP's choice); the filter scores every original and synthetic caption with\n"
            "its ITM head's match probability and its ITC similarity; the captions at or above the cut-off\n"
            "(--threshold on the ITM probability, default 0.5, or the top --keep-fraction by --score) form the\n"
            "training captions of OUT, a derived dataset (images linked, val/test annotations copied).\n"
            "OUT/capfilt.jsonl: one line per caption (origin, planted flag when --data has noise.jsonl, ITM\n"
            "probability, ITC similarity, kept); OUT/capfilt.json: settings, counts, and each scorer's ROC AUC,\n"
            "precision and recall at finding the planted captions. The dashboard's CapFilt page shows both.\n\n"
            "example:  python -m train capfilt --captioner runs/noisy --filter runs/noisy:3 \\\n"
            "              --data data/flickr8k-noisy --out data/flickr8k-boot --synthetic 1"
        ),
    )
    capfilt.add_argument("--captioner", required=True, metavar="RUN[:EPOCH]",
                         help="the run whose decoder writes the synthetic captions (default: its newest checkpoint; "
                              "unused with --synthetic 0, so any run, e.g. the filter's)")
    capfilt.add_argument("--filter", required=True, metavar="RUN[:EPOCH]",
                         help="the run whose ITM head (and ITC) scores the captions; may be the captioner's run")
    capfilt.add_argument("--data", required=True, metavar="DIR", help="the COCO-caption-format dataset to bootstrap")
    capfilt.add_argument("--out", required=True, metavar="DIR2", help="the bootstrapped dataset's folder")
    capfilt.add_argument("--synthetic", type=_count, default=1, metavar="K",
                         help="synthetic captions per image (default 1; 0 = filter the originals only)")
    capfilt.add_argument("--decoding", default="nucleus",
                         help=f"the captioner's strategy: {strategies} (default nucleus)")
    capfilt.add_argument("--score", default="auto", choices=("auto", "itm", "itc"),
                         help="what decides kept or dropped (default auto: itm when the filter has an ITM head)")
    keep = capfilt.add_mutually_exclusive_group()
    keep.add_argument("--threshold", type=float, help="keep captions with ITM match probability >= this, in [0, 1] "
                                                      "(default 0.5)")
    keep.add_argument("--keep-fraction", type=float, metavar="F", help="keep this share of all captions, the "
                                                                        "highest-scored, in (0, 1]")
    capfilt.add_argument("--train-annotations", metavar="FILE",
                         help="the training captions, relative to DIR (default: the filter run's data config)")
    capfilt.add_argument("--train-images", metavar="FOLDER",
                         help="their image folder, relative to DIR (default: the filter run's data config)")
    capfilt.add_argument("--batch-size", type=_positive_int, default=32, help="images a batch (default 32)")
    capfilt.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    capfilt.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_resume_arguments(capfilt, "continue a stopped run in OUT (same settings)",
                          "start again in an OUT that holds something")
    capfilt.set_defaults(func=cmd_capfilt)

    study = sub.add_parser(
        "study", help="run a study plan: stages of variants x seeds, one table",
        description="Run a study plan (TOML; see docs/studies.md) into a folder of "
                    "ordinary run directories, one per stage x variant x seed, then write study.json, study.csv "
                    "and study.md: one row per variant and decoding strategy (and reference row), mean and "
                    "spread over seeds. Running it again skips completed runs and resumes interrupted ones, so "
                    "a long study can be run a few runs at a time; Ctrl-C stops the current run resumably, and the "
                    "study with it.",
    )
    study.add_argument("plan", metavar="PLAN.toml")
    study.add_argument("--out", help="the study folder (default runs/study-<plan name>)")
    study.add_argument("--data-root", help="the dataset folder (overrides the plan's data.root, e.g. "
                       "../shared/data/flickr8k)")
    study.add_argument("--only", action="append", default=[], metavar="STAGE[/VARIANT]",
                       help="train only these runs, and the runs they start from, this time (repeatable; the "
                            "table still shows every run in the folder): run a long plan a few runs at a time")
    study.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=None,
                       metavar="0,1", help="train only these of the plan's seeds this time")
    study.add_argument("--results", type=Path, metavar="DIR",
                       help="keep each completed run's reported numbers (metrics only: no captions, no weights) "
                            "and each CapFilt summary in DIR, one small JSON file a run, and count them in the "
                            "table when the run's folder is gone: commit DIR to spread a study over machines "
                            "(a recorded run is not trained again)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.add_argument("--report", type=Path, metavar="FILE",
                       help="train nothing: write the table of the records in --results (alone: no run folder "
                            "counts) to FILE as Markdown, headed by the command that regenerates it; the project's "
                            "docs/results/<plan>.md pages are made this way")
    study.set_defaults(func=cmd_study)

    info = sub.add_parser("info", help="summary of a run: config, status, epochs, best metrics")
    info.add_argument("run_dir", metavar="RUN_DIR")
    info.add_argument("--json", action="store_true", help="print run.json and the epochs as JSON")
    info.set_defaults(func=cmd_info)

    diagnose = sub.add_parser(
        "diagnose", help="what went wrong in a run, in words, with the evidence",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Diagnose runs or study records (docs/diagnosis.md): token-repeat and caption collapse, captions no\n"
            "better than a reference row, alignment or ITM near chance, memorisation, over-confidence,\n"
            "optimisation faults and a starved step, each with when it started, its evidence, the dashboard\n"
            "page that shows it and the remedy the run's own evaluation or the committed records measured.\n"
            "The levels are declared, with their reasons, in blipcore/evaluation/metrics.py (THRESHOLDS).\n\n"
            "stdout: one block per run, a line per finding in order of onset (--json: a list of objects).\n"
            "exit status: 0 no finding reaches --fail-on; 1 one does; 2 a folder that is not a run or\n"
            "cannot be read, or a file that is not a study record."
        ),
    )
    source = diagnose.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", metavar="RUN", help="a run folder (one holding run.json)")
    source.add_argument("--runs-dir", metavar="DIR",
                        help="every run of a folder, the runs of its study folders included")
    source.add_argument("--record", nargs="+", type=Path, metavar="FILE",
                        help="study records (studies/results/<plan>/<run>.json): their history, or their reported "
                             "evaluation")
    diagnose.add_argument("--json", action="store_true", help="print the diagnoses as JSON")
    diagnose.add_argument("--fail-on", choices=SEVERITIES, default="error", metavar="SEVERITY",
                          help=f"exit 1 when a finding is at least this severe ({', '.join(SEVERITIES)}; "
                               "default error)")
    diagnose.set_defaults(func=cmd_diagnose)

    data = sub.add_parser("data", help="generate datasets, fetch and convert public ones")
    data_sub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shapes = data_sub.add_parser("shapes", help="captioned synthetic scenes in COCO caption format",
                                 description="Write generated scenes (shapes, colours, sizes, positions, counts, "
                                             "relations) with five captions each, plus a held-out split of unseen "
                                             "colour-shape combinations, in COCO caption format.")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--n-train", type=int, default=3000)
    shapes.add_argument("--n-val", type=int, default=300)
    shapes.add_argument("--n-heldout", type=int, default=300)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(func=cmd_data_shapes)

    coco = data_sub.add_parser(
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
    coco.add_argument("--first", type=_count, default=10000, metavar="N",
                      help="the first N train2017 images of the annotation file (default 10000; 0: all 118,287)")
    coco.add_argument("--val-first", type=_count, default=1000, metavar="M",
                      help="the first M val2017 images (default 1000; 0: all 5,000)")
    coco.add_argument("--annotations", default=OFFICIAL_ANNOTATIONS_URL, metavar="PATH_OR_URL",
                      help="annotations_trainval2017.zip as a URL or a local file, or a folder holding "
                           "captions_train2017.json and captions_val2017.json (default: the official URL)")
    coco.add_argument("--workers", type=_positive_int, default=16, metavar="N",
                      help="images fetched at once (default 16)")
    coco.add_argument("--format", choices=("folder", "shards"), default="folder",
                      help="folder (default): the COCO folder; shards: also WebDataset shards of it in OUT/shards "
                           "(as `data shards` writes them), for data.kind = \"webdataset\"")
    _add_download_arguments(coco)
    coco.set_defaults(func=cmd_data_coco)

    flickr = data_sub.add_parser(
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
    flickr.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="images decoded and written at once (default: the CPU count, at most 8)")
    _add_download_arguments(flickr)
    flickr.set_defaults(func=cmd_data_flickr8k)

    shards = data_sub.add_parser(
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
    _add_source_and_out(shards, "output folder, e.g. data/flickr8k-shards", out_metavar="DIR")
    shards.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                        help="images a shard (default 1000: ~100-200 MB of COCO photos). Every DDP rank x DataLoader "
                             "worker needs at least one shard")
    shards.add_argument("--train-files", type=_count, default=1000, metavar="N",
                        help="the first N train images also written as files (default 1000, what the evaluation's "
                             "nearest-neighbour row reads)")
    shards.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="shards written at once (default: the CPU count, at most 8)")
    _add_resume_arguments(shards, "write only the shards that are missing",
                          "start again in an OUT that holds something")
    shards.set_defaults(func=cmd_data_shards)

    noise = data_sub.add_parser(
        "noise", help="plant known noise: replace a fraction of the training captions with other images' captions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Copy a COCO-caption-format dataset's annotations into OUT, replacing --fraction of the training\n"
            "captions with captions of other, randomly chosen images (as web alt-text is often unrelated to its\n"
            "image). Images and the other entries are linked, not copied; the val and test annotations are\n"
            "copied unchanged. OUT/noise.jsonl says, for every training caption, whether it was replaced and\n"
            "what it said before: CapFilt's filter is scored against it.\n\n"
            "example:  python -m train data noise --from ../shared/data/flickr8k --out data/flickr8k-noisy \\\n"
            "              --fraction 0.3 --train-annotations annotations/captions_official_train.json"
        ),
    )
    _add_source_and_out(noise, "the noisy dataset's folder")
    noise.add_argument("--fraction", type=float, required=True,
                       help="share of the training captions to replace, in [0, 1)")
    noise.add_argument("--seed", type=int, default=0, help="which captions are replaced, and by which (default 0)")
    noise.add_argument("--train-annotations", default=DataConfig().train_annotations, metavar="FILE",
                       help="the training captions, relative to DIR (default %(default)s; Flickr8k's official "
                            "split: annotations/captions_official_train.json)")
    noise.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in OUT")
    noise.set_defaults(func=cmd_data_noise)

    resize = data_sub.add_parser(
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
    _add_source_and_out(resize, "the resized copy's folder (outside DIR)")
    resize.add_argument("--size", type=int, required=True, metavar="PX",
                        help=f"every image's shorter side afterwards, in pixels (at least {MIN_SIZE})")
    resize.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                        help=f"JPEG and WebP quality, 1-{MAX_QUALITY} (default %(default)s)")
    resize.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                        help="files processed at once (default %(default)s threads: a file mostly waits on the "
                             "disk)")
    _add_resume_arguments(resize, "continue an interrupted run into OUT (same settings): write only the missing files",
                          "start again in an OUT that holds something: deletes what this command writes there")
    resize.set_defaults(func=cmd_data_resize)
    return parser


def main(argv: list[str] | None = None) -> int:
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
