"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping and accumulation, bf16
autocast on CUDA, DistributedDataParallel, exact resume, progress bars, evaluation at epoch ends.

Determinism: the data order is a DistributedSampler permutation seeded by (seed, epoch), so the
global batches are the same for any number of processes; captions and augmentation draw from a
per-sample seed (the dataset's job), so DataLoader workers' own random streams never matter;
evaluation runs under a forked RNG so it never shifts training's random stream, and the data loader
draws from its own generator, not the global one. A run stopped or killed and resumed on CPU ends
with the same weights as one never stopped, with or without workers: every file is replaced
atomically and checkpoints/last/ is written state.json last (blipcore.runs.rundir).

One trainer per run folder: the main process holds the run's trainer lock from before it touches
the folder until it ends. SIGINT / SIGTERM (to the process or its whole group) finish the current
step, save and stop; DataLoader workers ignore both, so a signal to the group cannot kill them first.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ..evaluation.decoding import check_strategy_names
from ..evaluation.metrics import metric
from ..io import is_number
from ..model.blip import BLIP
from ..model.config import BlipConfig
from ..model.vocabulary import CompactEmbedding, training_word_pieces
from ..runs import rundir
from ..runs.rundir import CheckpointError, RunDir
from ..speed import autocast_dtype, describe
from .distributed import DistInfo, ResumableSampler, barrier, init_distributed, select_device
from .environment import environment_info, git_revision
from .step import (
    NonFiniteLossError,
    StepMonitor,
    build_optimizer,
    learning_rate,
    no_region,
    parameter_groups,
    step_module,
    train_step,
)

# Imported from here by the command line, the tests and benchmarks: the step, its optimizer and schedule, the
# distributed helpers and the run's environment live in step.py, distributed.py and environment.py.
__all__ = ["POSITION_KEYS", "DistInfo", "NonFiniteLossError", "ResumableSampler", "Trainer", "barrier",
           "build_optimizer", "environment_info", "git_revision", "ignore_stop_signals", "init_distributed",
           "learning_rate", "no_region", "parameter_groups", "select_device", "train_step"]


POSITION_KEYS = ("step", "epoch", "batch_in_epoch")  # where training stands: saved in checkpoints/last/state.json


def _timed_batches(loader: Iterable[Any], window: dict[str, Any]) -> Iterator[Any]:
    """The loader's batches, adding to window["wait"] the seconds the loop waited for each (starting the
    workers included): logged as data_wait_share, the share of the time a step waited for its data."""
    started = time.perf_counter()
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        window["wait"] += time.perf_counter() - started
        yield batch
        started = time.perf_counter()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGINT / SIGTERM sent to the whole process group (Ctrl-C, `timeout`,
    `docker stop`, Slurm) are the main process's to handle. A worker killed by them would fail the run
    before the main process could finish its step and save; the main process stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
        """Train to the end of the step budget (or until stopped). Returns the summary (status, step,
        epoch, run_dir, train_seconds, best) on the main process, and {} on the other DDP ranks."""
        cfg = self.cfg
        check_strategy_names(cfg.train.eval_strategies)  # now, not after the first epoch's training
        if cfg.train.init and not self.resume:
            rundir.init_checkpoint(cfg.train.init)  # a missing run or checkpoint is refused before anything is written
        wants_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.device = select_device(cfg.train.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        lock = None
        if self.dist.is_main:  # one trainer per run folder: the main process holds its lock until it ends
            lock, _ = self.run.prepare_for_training(self.resume, self.overwrite)
        try:
            barrier(self.dist)
            self.resume = self.resume and self.run.has_state()  # prepare_for_training's decision
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
            if lock is not None:
                lock.release()
            if self.dist.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
        return self.summary

    # --- setup ---------------------------------------------------------------------------------
    def _build(self) -> None:
        from ..data import CaptionCollator, build_datasets
        from ..data.image_cache import CacheLoader

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if self.dist.is_main:  # the main process generates synthetic data; the others wait and read it
            self.datasets = build_datasets(cfg, splits=("train", "val"))
        barrier(self.dist)
        if not self.dist.is_main:
            self.datasets = build_datasets(cfg, splits=("train", "val"))
        self.train_set = self.datasets["train"]
        # A streamed dataset (WebDataset shards) deals its shards out to ranks and workers itself: no sampler
        self.sampler = None if isinstance(self.train_set, IterableDataset) else ResumableSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.train.seed
        )
        self.collate = CaptionCollator(cfg.model.max_text_len)
        # data.loader = "cache": the decoded-image cache, built on first use (one process builds, the others wait)
        self.cache_loader = None if cfg.data.loader != "cache" else CacheLoader.from_config(
            cfg, self.train_set, self.device, progress=self.progress and self.dist.is_main)
        # More loader processes than cores only take time from the step (a preset written for a big machine
        # asks for 4): bounded by the cores this process may use. The cache loader runs in this process.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = 0 if self.cache_loader is not None else min(cfg.data.num_workers, cores)
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

        word_pieces = None
        init = None if self.resume or not cfg.train.init else self._read_init_weights(cfg.train.init)
        if cfg.model.vocabulary == "captions" and self.resume:  # its map comes with its weights, its size with run.json
            cfg = self.cfg = cfg.override({"model.vocab_size": self.run.config().model.vocab_size})
        elif cfg.model.vocabulary == "captions":
            # A run started from another's weights keeps their word pieces (a fine-tune on other captions, e.g. a
            # CapFilt filter on a clean subset: a piece they lack reads as [UNK]); else its training captions'
            pieces = None if init is None else init[1].get("word_embeddings.to_full")
            word_pieces = pieces.tolist() if pieces is not None else training_word_pieces(self.train_set,
                                                                                         cfg.model.prompt)
            cfg = self.cfg = cfg.override({"model.vocab_size": len(word_pieces)})
        self.model = BLIP(cfg, word_pieces).to(self.device)
        self.init_report = None if init is None else self._load_init_weights(cfg.train.init, *init)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.started = time.time()
        if self.resume:
            self._load_state()
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.autocast = autocast_dtype(self.device, cfg.train.precision)  # measured on this machine for "auto"
        if self.dist.world_size > 1 and self.device.type == "cpu":  # every rank follows the first's measurement
            choice = torch.tensor([self.autocast is not None], dtype=torch.uint8)
            dist.broadcast(choice, src=0)
            self.autocast = torch.bfloat16 if choice.item() else None
        self.summary: dict[str, Any] = {}

    def _write_run_info(self) -> None:
        if self.resume and self.run.exists():
            # The code and machine of each resume, beside those the run started with (its top-level fields): a run
            # continued by other code or on another machine says so.
            resumes = [*self.run.read_info().get("resumes", []),
                       {"at": rundir.now(), "step": self.step, **environment_info(self.device)}]
            self.run.update_info(status="running", config=self.cfg.to_dict(), error=None,
                                 autocast=describe(self.autocast), resumes=resumes)
            return
        self.run.write_info({
            "name": self.run.name,
            "preset": self.cfg.name,
            "status": "running",
            "error": None,
            "created_at": rundir.now(),
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "parameters": self.model.num_parameters(),
            "train_items": len(self.train_set),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "autocast": describe(self.autocast),  # what train.precision came to on this machine
            "data_workers": self.workers,  # data.num_workers, bounded by the cores
            "init": self.init_report,
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
        window = {"samples": 0, "time": time.time(), "wait": 0.0}
        while self.epoch < cfg.epochs and self.step < self.total_steps and not self.stop_requested:
            if self.sampler is None:
                self.train_set.start_batch = self.batch_in_epoch  # it yields the rest of this epoch's batches
            else:
                self.sampler.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * cfg.batch_size
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            micro: list[dict] = []
            for batch in _timed_batches(self._epoch_loader(), window):
                self.batch_in_epoch += 1
                if batch is not None:
                    micro.append(batch)
                if len(micro) < cfg.grad_accum_steps and self.batch_in_epoch < self.batches_per_epoch:
                    continue
                if micro:
                    samples = self._optimizer_step(micro)
                    micro = []
                    self.step += 1
                    bar.update(1)
                    self._log_window(window, samples, bar)
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
        if finished and self.batch_in_epoch:
            self._end_of_epoch()  # a step budget that ends inside an epoch: its final weights are the run's result
        else:
            self._save_state()
        if self.dist.is_main:
            status = "completed" if finished else "interrupted"
            info = self.run.update_info(
                status=status, finished_at=rundir.now(), steps_done=self.step, epochs_done=self.epoch,
                train_seconds=round(time.time() - self.started, 1),
            )
            self.summary = {"status": status, "step": self.step, "epoch": self.epoch, "run_dir": str(self.run.path),
                            "train_seconds": info["train_seconds"], "best": info.get("best", {})}
        barrier(self.dist)

    @functools.cached_property
    def monitor(self) -> StepMonitor:
        """The device-side record of the steps (loss terms, gradient norms, the first non-finite step)."""
        return StepMonitor(self.device)

    @functools.cached_property
    def _step_module(self) -> tuple[nn.Module, int]:
        """What each step runs (the model, compiled as train.compile says) and the caption length it pads to."""
        return step_module(self.ddp_model, self.cfg.train.compile, self.device, self.cfg.model.max_text_len)

    def _epoch_loader(self) -> Iterable[dict[str, Any] | None]:
        """This epoch's batches from the sampler's position on: the image cache's, or a DataLoader's over the folder
        dataset (with its own generator: starting an epoch, or a resumed one, leaves the global RNG alone)."""
        cfg = self.cfg.train
        if self.cache_loader is not None:
            return self.cache_loader.batches(self.sampler)
        return DataLoader(
            self.train_set, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=self.collate,
            num_workers=self.workers, drop_last=True, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed + self.epoch), worker_init_fn=ignore_stop_signals,
        )

    def _optimizer_step(self, micro: list[dict]) -> int:
        """One optimiser step over the accumulated micro-batches at the schedule's learning rate; the samples seen.
        It waits for nothing on a GPU (its numbers go to self.monitor); on a CPU, where reading them costs nothing,
        a non-finite loss or gradient norm stops the run at that step."""
        train = self.cfg.train
        lr = learning_rate(self.step, self.total_steps, train.lr, train.warmup_steps, train.min_lr_ratio)
        module, pad_to = self._step_module
        samples = train_step(module, self.optimizer, micro, lr=lr, grad_clip=train.grad_clip, device=self.device,
                             autocast=self.autocast, step=self.step + 1, world_size=self.dist.world_size,
                             monitor=self.monitor, pad_to=pad_to)
        if self.device.type == "cpu":
            self.monitor.check()
        return samples

    def _log_window(self, window: dict, samples: int, bar: tqdm) -> None:
        """Every log_every-th step, one line of the window's means from self.monitor: the host's one read of the
        device in those steps (NonFiniteLossError, naming the first bad step, if one was not finite)."""
        window["samples"] += samples
        # every log_every-th step (not every log_every steps from the start): a resumed run logs the same steps
        if self.step % max(1, self.cfg.train.log_every) and self.step < self.total_steps:
            return
        means = self.monitor.read()
        elapsed = max(time.time() - window["time"], 1e-9)
        record = {
            "step": self.step, "epoch": self._epoch_progress(),
            "split": "train", **means, "lr": self.optimizer.param_groups[0]["lr"],
            "temperature": float(self.model.temperature) if self.model.use_itc else None,
            "samples_per_s": window["samples"] / elapsed, "data_wait_share": min(1.0, window["wait"] / elapsed),
        }
        bar.set_postfix(loss=f"{means['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}", refresh=False)
        if self.dist.is_main:
            self.run.append_metrics(record)
        window.update(samples=0, time=time.time(), wait=0.0)

    # --- epoch ends, evaluation and state ------------------------------------------------------
    def _end_of_epoch(self) -> None:
        """Evaluate, write the epoch checkpoint, update the best metrics, save resumable state. A run whose
        step budget ends inside an epoch ends here too: its checkpoint carries the number of the epoch in
        progress (a resumed run that finishes that epoch replaces it) and `epoch_progress` in its sidecar."""
        number = self.epoch + (1 if self.batch_in_epoch else 0)
        metrics = self._evaluate(label=f"epoch_{number:03d}", epoch=number)
        if self.dist.is_main:
            self.run.save_checkpoint(self.model, self.cfg, number, self.step, metrics,
                                     epoch_progress=self._epoch_progress())
            self.run.prune_checkpoints(self.cfg.train.keep_checkpoints)
            self._update_best(metrics, number)
        self._save_state()

    def _epoch_progress(self) -> float:
        """Epochs done, with the fraction of the epoch in progress."""
        return round(self.epoch + self.batch_in_epoch / self.batches_per_epoch, 4)

    def _evaluate(self, label: str, epoch: int | None) -> dict[str, Any]:
        """Validation losses, retrieval, captioning and the embeddings dump, on the main process only,
        under a forked RNG so that evaluating never changes training's random stream."""
        self.monitor.check()  # a step recorded non-finite on the device stops the run before it is evaluated
        metrics: dict[str, Any] = {}
        if self.dist.is_main:
            from ..evaluation.evaluator import evaluate_run_epoch

            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.model.eval()
                metrics = evaluate_run_epoch(
                    self.model, self.cfg, self.datasets, self.run, epoch=epoch, step=self.step, label=label,
                    device=self.device, progress=self.progress, epoch_progress=self._epoch_progress(),
                )
                self.model.train()
        barrier(self.dist)
        return metrics

    def _update_best(self, metrics: dict[str, Any], epoch: int) -> None:
        """Record in run.json each metric's best value so far and its epoch, in the metric's declared
        better direction (blipcore.evaluation.metrics); metrics without one (lengths, settings) are not ranked."""
        best = self.run.read_info().get("best", {})
        for key, value in metrics.items():
            declared = metric(key)
            if declared is None or declared.better is None or not is_number(value):
                continue
            old = best.get(key)
            old_value = old.get("value") if isinstance(old, dict) else None
            if declared.improves(value, old_value if is_number(old_value) else None):
                best[key] = {"value": value, "epoch": epoch}
        self.run.update_info(best=best, epochs_done=self.epoch, steps_done=self.step)

    def _save_state(self) -> None:
        """checkpoints/last/ (RunDir.save_state): weights, optimizer and RNG states, and the position."""
        self.monitor.check()  # a step recorded non-finite on the device stops the run before it is saved
        if self.dist.is_main:
            training = {
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "train_seconds": time.time() - self.started,  # a resumed run's minutes go on from here
            }
            position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
            self.run.save_state(self.model, training, position, self.cfg)
        barrier(self.dist)

    @staticmethod
    def _read_init_weights(spec: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """train.init's checkpoint and its verified weights."""
        ckpt = rundir.init_checkpoint(spec)
        return ckpt, rundir.read_verified_weights(ckpt.weights, ckpt.meta.get("sha256"))

    def _load_init_weights(self, spec: str, ckpt: Any, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """train.init: this run starts from another run's checkpoint (its weights only: a fresh optimizer,
        schedule and data order). What was loaded goes into run.json ("init")."""
        pieces = state.get("word_embeddings.to_full")
        has_words = any(name.startswith("word_embeddings.") for name in state)  # an MAE run's checkpoint has none
        if isinstance(self.model.word_embeddings, CompactEmbedding) and has_words and (
                pieces is None or not torch.equal(pieces, self.model.word_embeddings.to_full.cpu())):
            raise ValueError(f"train.init {spec}: its word embeddings are not of this run's vocabulary (the word "
                             "pieces of these training captions), so its rows would mean other words")
        parts = rundir.load_init_weights(self.model, state, str(ckpt.weights))
        return {"run": str(ckpt.weights.parent.parent), "epoch": ckpt.epoch, "step": ckpt.step, **parts}

    def _load_state(self) -> None:
        """Restore checkpoints/last/ (RunDir.load_state verifies every file), then the optimizer and RNGs."""
        saved = self.run.load_state(self.model, POSITION_KEYS)
        try:
            self.optimizer.load_state_dict(saved.training["optimizer"])
            torch.set_rng_state(saved.training["torch_rng"])
            if self.device.type == "cuda" and saved.training.get("cuda_rng"):
                torch.cuda.set_rng_state_all(saved.training["cuda_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            problem = f"{type(err).__name__}: {err}"
            raise CheckpointError(f"{saved.source}: not the optimizer state of this run ({problem})") from None
        self.step, self.epoch, self.batch_in_epoch = (saved.position[key] for key in POSITION_KEYS)
        # the wall seconds that led to this state (a state saved before they were kept: those run.json has)
        earlier = saved.training.get("train_seconds", self.run.read_info().get("train_seconds"))
        self.started -= earlier if isinstance(earlier, float | int) and math.isfinite(earlier) else 0.0
        if self.dist.is_main:
            self.run.truncate_metrics(after_step=self.step)

    def _mark_failed(self, err: BaseException) -> None:
        if not self.run.exists():
            return
        interrupted = isinstance(err, KeyboardInterrupt)
        message = "interrupted without saving (second interrupt)" if interrupted else f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            self.run.update_info(status="interrupted" if interrupted else "failed", error=message,
                                 failed_at=rundir.now(), steps_done=self.step)
