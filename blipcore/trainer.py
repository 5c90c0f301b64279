"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping and accumulation, bf16
autocast on CUDA, DistributedDataParallel, exact resume, progress bars, evaluation at epoch ends.

Determinism: the data order is a DistributedSampler permutation seeded by (seed, epoch), so the
global batches are the same for any number of processes; augmentation draws from a per-sample seed
(the dataset's job); evaluation runs under a forked RNG so it never shifts training's random stream,
and the data loader draws from its own generator, not the global one.
A run stopped or killed and resumed on CPU ends with the same weights as one never stopped: every
file is replaced atomically, checkpoints/last/ files are named by step and content, and state.json
(which names them, with their sha256) is written last.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import runs
from .config import BlipConfig
from .decoding import check_strategy_names
from .model import BLIP
from .runs import CheckpointError, RunDir, RunError

LOSS_TERMS = ("loss", "itc", "lm", "itm")
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "embeddings", "eval", "projections")


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the run stops before applying it."""


# --- distributed helpers -----------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes through RANK / WORLD_SIZE, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def select_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device (this torch build: "
                             f"{torch.__version__}); use --device cpu")
        return torch.device("cuda", info.local_rank)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device("cpu")


# --- optimisation ------------------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, embeddings, [CLS]/position tables, temperature."""
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to base_lr over warmup_steps, then cosine decay to base_lr * min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (resume mid-epoch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


# --- run metadata ------------------------------------------------------------------------------
def environment_info(device: torch.device) -> dict[str, Any]:
    import numpy
    import transformers

    from . import __version__

    versions = {
        "blipcore": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    return {"versions": versions, "device": {"type": device.type, "name": device_name}, "git_revision": git_revision()}


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def prepare_run_dir(run: RunDir, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run silently, and fail before training if the folder cannot be written.
    Temporary files that a process killed mid-write left in the run are removed. A run asked to resume
    that stopped before its first save (run.json, but neither checkpoints/last/state.json nor an epoch
    checkpoint) has nothing to continue from: it is cleared and starts again from step 0."""
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"{run.path} exists and is not a folder")
    if resume and not (run.last_dir / "state.json").is_file():
        if not run.exists():
            raise RunError(f"{run.path}: nothing to resume (no run.json); start it without --resume")
        if run.checkpoints():
            raise RunError(f"{run.path}: nothing to resume from (checkpoints/last/state.json is missing); "
                           "--overwrite starts the run again from step 0, deleting its epoch checkpoints")
        tqdm.write(f"{run.path}: stopped before its first save; starting it again from step 0")
        resume, overwrite = False, True
    if resume:
        run.remove_stale_temporaries()
    elif run.exists():
        status = run.read_info().get("status")
        if not overwrite:
            hint = "--resume continues it" if status != "completed" else "choose another --run-dir"
            raise RunError(f"{run.path} already holds a {status} run: {hint}, or pass --overwrite to replace it")
        for name in RUN_FILES:
            target = run.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        run.remove_stale_temporaries()
    elif run.path.is_dir():
        if any(not runs.STALE_TEMPORARY_PATTERN.fullmatch(p.name) for p in run.path.iterdir()):
            raise RunError(f"{run.path} is a non-empty folder that is not a run; pick an empty or new --run-dir")
        run.remove_stale_temporaries()  # a first start killed while writing run.json
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run.path) as probe:  # leaves nothing behind, even if killed
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise RunError(
            f"{run.path}: cannot write the run folder ({err.strerror or err}); fix permissions or free space"
        ) from None


# --- the trainer -------------------------------------------------------------------------------
class Trainer:
    """Trains one run into a run directory. `fit()` returns the final summary."""

    def __init__(
        self,
        cfg: BlipConfig,
        run_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.stop_requested = False

    # The trainer is long; its parts are methods in the order fit() calls them.
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        check_strategy_names(cfg.train.eval_strategies)  # now, not after the first epoch's training
        self.dist = init_distributed("cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = select_device(cfg.train.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.dist.is_main:
            prepare_run_dir(self.run, self.resume, self.overwrite)
        barrier(self.dist)
        self.resume = self.resume and (self.run.last_dir / "state.json").is_file()  # prepare_run_dir's decision
        self._build()
        if self.dist.is_main:
            self._write_run_info()
        try:
            with self._graceful_interrupt():
                self._train()
        except BaseException as err:
            if self.dist.is_main:
                self._mark_failed(err)
            raise
        finally:
            if self.dist.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
        return self.summary

    # --- setup ---------------------------------------------------------------------------------
    def _build(self) -> None:
        from .data import CaptionCollator, build_datasets

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if self.dist.is_main:  # the main process generates synthetic data; the others wait and read it
            self.datasets = build_datasets(cfg, splits=("train", "val"))
        barrier(self.dist)
        if not self.dist.is_main:
            self.datasets = build_datasets(cfg, splits=("train", "val"))
        self.train_set = self.datasets["train"]
        self.sampler = ResumableSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.train.seed
        )
        self.collate = CaptionCollator(cfg.model.max_text_len)
        self.batches_per_epoch = len(self.train_set) // self.dist.world_size // cfg.train.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.train_set)} training items cannot fill one batch of {cfg.train.batch_size} "
                f"on {self.dist.world_size} process(es); lower train.batch_size"
            )
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        self.model = BLIP(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas)
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.started = time.time()
        if self.resume:
            self._load_state()
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        precision = cfg.train.precision
        self.use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.summary: dict[str, Any] = {}

    def _write_run_info(self) -> None:
        if self.resume and self.run.exists():
            self.run.update_info(status="running", config=self.cfg.to_dict(), error=None, resumed_at=runs.now())
            return
        self.run.write_info({
            "name": self.run.name,
            "preset": self.cfg.name,
            "status": "running",
            "error": None,
            "created_at": runs.now(),
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "parameters": self.model.num_parameters(),
            "train_items": len(self.train_set),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            **environment_info(self.device),
        })

    @contextlib.contextmanager
    def _graceful_interrupt(self) -> Iterator[None]:
        """First Ctrl-C / SIGTERM: finish the current step, save resumable state, stop. Second: abort."""
        if threading.current_thread() is not threading.main_thread():  # Streamlit, test threads
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            tqdm.write(f"Stopping after this step (signal {signum}); interrupt again to abort without saving.")

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --- the loop ------------------------------------------------------------------------------
    def _train(self) -> None:
        cfg = self.cfg.train
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=f"train {self.run.name}", unit="step",
            disable=not (self.progress and self.dist.is_main), dynamic_ncols=True,
        )
        window = {"samples": 0, "time": time.time(), "sums": {}, "count": 0}
        while self.epoch < cfg.epochs and self.step < self.total_steps and not self.stop_requested:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.batch_in_epoch * cfg.batch_size
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            loader = DataLoader(  # its own generator: starting an epoch (or a resumed one) leaves the global RNG alone
                self.train_set, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=self.collate,
                num_workers=self.cfg.data.num_workers, drop_last=True, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed + self.epoch),
            )
            micro: list[dict] = []
            for batch in loader:
                self.batch_in_epoch += 1
                if batch is not None:
                    micro.append(batch)
                if len(micro) < cfg.grad_accum_steps and self.batch_in_epoch < self.batches_per_epoch:
                    continue
                if micro:
                    terms, grad_norm, samples = self._optimizer_step(micro)
                    micro = []
                    self.step += 1
                    bar.update(1)
                    self._log_window(window, terms, grad_norm, samples, bar)
                if self.step >= self.total_steps or self.stop_requested:
                    break
                if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                    self._evaluate(label=f"step_{self.step}", epoch=None)
                # (after the epoch's last batch _end_of_epoch saves it, after the evaluation and checkpoint)
                epoch_ends = self.batch_in_epoch >= self.batches_per_epoch
                if cfg.save_state_every and self.step % cfg.save_state_every == 0 and not epoch_ends:
                    self._save_state()
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._end_of_epoch()
        bar.close()
        finished = self.step >= self.total_steps or self.epoch >= cfg.epochs
        self._save_state()
        if self.dist.is_main:
            status = "completed" if finished else "interrupted"
            info = self.run.update_info(
                status=status, finished_at=runs.now(), steps_done=self.step, epochs_done=self.epoch,
                train_seconds=round(time.time() - self.started, 1),
            )
            self.summary = {"status": status, "step": self.step, "epoch": self.epoch, "run_dir": str(self.run.path),
                            "train_seconds": info["train_seconds"], "best": info.get("best", {})}
        barrier(self.dist)

    def _optimizer_step(self, micro: list[dict]) -> tuple[dict[str, float], float, int]:
        """One optimiser step over the accumulated micro-batches; raises before applying a non-finite update."""
        lr = learning_rate(self.step, self.total_steps, self.cfg.train.lr, self.cfg.train.warmup_steps, self.cfg.train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp_model.train()
        sums: dict[str, float] = {}
        samples = 0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or self.dist.world_size == 1
            context = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with context, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                out = self.ddp_model(
                    batch["images"].to(self.device, non_blocking=True),
                    batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device),
                    batch["image_ids"].to(self.device),
                )
                values = {k: v.detach().float() for k, v in out.items()}
                bad = [k for k, v in values.items() if k != "loss" and not torch.isfinite(v)]
                if bad or not torch.isfinite(values["loss"]):
                    term = bad[0] if bad else "total"
                    shown = ", ".join(f"{k}={v.item():.4g}" for k, v in values.items())
                    raise NonFiniteLossError(
                        f"step {self.step + 1}: the {term} loss is not finite ({shown}); the run stops and "
                        "the last checkpoint is kept. Lower train.lr or check the data."
                    )
                (out["loss"] / len(micro)).backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v.item() / len(micro)
            samples += len(batch["images"]) * self.dist.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"step {self.step + 1}: the gradient norm is {grad_norm.item()}; the run stops "
                                     "and the last checkpoint is kept. Lower train.lr.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, float(grad_norm), samples

    def _log_window(self, window: dict, terms: dict[str, float], grad_norm: float, samples: int, bar: tqdm) -> None:
        window["samples"] += samples
        window["count"] += 1
        for k, v in terms.items():
            window["sums"][k] = window["sums"].get(k, 0.0) + v
        window.setdefault("grad", 0.0)
        window["grad"] += grad_norm
        # every log_every-th step (not every log_every steps from the start): a resumed run logs the same steps
        if self.step % max(1, self.cfg.train.log_every) and self.step < self.total_steps:
            return
        elapsed = max(time.time() - window["time"], 1e-9)
        means = {k: v / window["count"] for k, v in window["sums"].items()}
        record = {
            "step": self.step, "epoch": round(self.epoch + self.batch_in_epoch / self.batches_per_epoch, 4),
            "split": "train", **means, "lr": self.optimizer.param_groups[0]["lr"],
            "temperature": float(self.model.temperature) if self.model.use_itc else None,
            "grad_norm": window["grad"] / window["count"], "samples_per_s": window["samples"] / elapsed,
        }
        bar.set_postfix(loss=f"{means['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}", refresh=False)
        if self.dist.is_main:
            self.run.append_metrics(record)
        window.update(samples=0, time=time.time(), sums={}, count=0, grad=0.0)

    # --- epoch ends, evaluation and state ------------------------------------------------------
    def _end_of_epoch(self) -> None:
        metrics = self._evaluate(label=f"epoch_{self.epoch:03d}", epoch=self.epoch)
        if self.dist.is_main:
            self.run.save_checkpoint(self.model, self.cfg, self.epoch, self.step, metrics)
            self.run.prune_checkpoints(self.cfg.train.keep_checkpoints)
            self._update_best(metrics)
        self._save_state()

    def _evaluate(self, label: str, epoch: int | None) -> dict[str, Any]:
        """Validation losses, retrieval, captioning and the embeddings dump, on the main process only,
        under a forked RNG so that evaluating never changes training's random stream."""
        metrics: dict[str, Any] = {}
        if self.dist.is_main:
            from .evaluation import evaluate_run_epoch

            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.model.eval()
                metrics = evaluate_run_epoch(
                    self.model, self.cfg, self.datasets, self.run, epoch=epoch, step=self.step, label=label,
                    device=self.device, progress=self.progress,
                )
                self.model.train()
        barrier(self.dist)
        return metrics

    def _update_best(self, metrics: dict[str, Any]) -> None:
        best = self.run.read_info().get("best", {})
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or value is None:
                continue
            lower_is_better = key.startswith("val_") or key.endswith(("loss", "repetition_rate"))
            old = best.get(key)
            if old is None or (value < old["value"] if lower_is_better else value > old["value"]):
                best[key] = {"value": value, "epoch": self.epoch}
        self.run.update_info(best=best, epochs_done=self.epoch, steps_done=self.step)

    def _save_state(self) -> None:
        """checkpoints/last/: new weight and optimizer files first, state.json (naming them) last,
        then older files removed — a crash at any point leaves a complete, loadable state. The files
        are named by step and content, so a save never replaces a file the current state.json names
        with different bytes."""
        if not self.dist.is_main:
            barrier(self.dist)
            return
        last = self.run.last_dir
        weights = runs.encode_weights(self.model)
        optim = runs.encode_torch_state({
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        })
        weights_sha, optim_sha = runs.sha256_bytes(weights), runs.sha256_bytes(optim)
        weights_name = f"model-step{self.step:08d}-{weights_sha[:12]}.safetensors"
        optim_name = f"optimizer-step{self.step:08d}-{optim_sha[:12]}.pt"
        runs.atomic_write_bytes(last / weights_name, weights)
        runs.atomic_write_bytes(last / optim_name, optim)
        runs.atomic_write_json(last / "state.json", {
            "format_version": runs.FORMAT_VERSION,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "weights": weights_name, "weights_sha256": weights_sha,
            "optimizer": optim_name, "optimizer_sha256": optim_sha,
            "config": self.cfg.to_dict(), "saved_at": runs.now(),
        })
        for stale in last.iterdir():
            if stale.name not in (weights_name, optim_name, "state.json") and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)
        barrier(self.dist)

    def _load_state(self) -> None:
        """Restore checkpoints/last/: every file verified against the sha256 that state.json records,
        the optimizer file read without unpickling; any damage is a CheckpointError naming the file."""
        last = self.run.last_dir
        state_path = last / "state.json"
        state = runs.read_json(state_path, "resumable state")
        names = {key: state.get(key) for key in ("weights", "optimizer")}
        position = {key: state.get(key) for key in ("step", "epoch", "batch_in_epoch")}
        bad = [f"{k}={v!r}" for k, v in names.items()
               if not isinstance(v, str) or v in ("", ".", "..") or Path(v).name != v]  # a file of last/, nothing else
        bad += [f"{k}={v!r}" for k, v in position.items() if type(v) is not int or v < 0]
        if bad:
            raise CheckpointError(f"{state_path}: damaged ({', '.join(bad)}); the run cannot be resumed")
        weights = runs.read_verified_weights(last / names["weights"], state.get("weights_sha256"))
        runs.load_model_state(self.model, weights, str(last / names["weights"]))
        optim_path = last / names["optimizer"]
        expected = state.get("optimizer_sha256")
        try:
            actual = runs.sha256_file(optim_path)
        except OSError as err:
            raise CheckpointError(f"{optim_path}: cannot be read ({err.strerror or err})") from None
        if actual != expected:
            raise CheckpointError(f"{optim_path}: sha256 does not match state.json (truncated or corrupted)")
        saved = runs.load_torch_state(optim_path)
        if not isinstance(saved, dict):
            raise CheckpointError(f"{optim_path}: not the optimizer state of this run (a {type(saved).__name__})")
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            if self.device.type == "cuda" and saved.get("cuda_rng"):
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            problem = f"{type(err).__name__}: {err}"
            raise CheckpointError(f"{optim_path}: not the optimizer state of this run ({problem})") from None
        self.step, self.epoch, self.batch_in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
        if self.dist.is_main:
            self.run.truncate_metrics(after_step=self.step)

    def _mark_failed(self, err: BaseException) -> None:
        if not self.run.exists():
            return
        interrupted = isinstance(err, KeyboardInterrupt)
        message = "interrupted without saving (second interrupt)" if interrupted else f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            self.run.update_info(status="interrupted" if interrupted else "failed", error=message, failed_at=runs.now(),
                                 steps_done=self.step)
