"""The training runtime that pretraining and fine-tuning share, written once.

compute_init() sets a training process up (as nanochat's common.compute_init): it joins the
torchrun job if there is one, picks the device, the dtype and autocast, the CPU threads, TF32
on CUDA and deterministic algorithms on the CPU; compute_cleanup() puts everything back.

A stage is a TrainingRun subclass that says only what differs: its data and model (build),
the micro-batches of a step and their weights in the loss (next_batches), the batches it
evaluates on, and what its checkpoints, log records and summary carry besides the common
parts. TrainingRun does the rest, into <workdir>/<stage>/:

    restart      rerunning resumes from the newest complete checkpoint; overwrite starts over
    the step     micro-batches accumulated (under DDP the all-reduce on the last one only),
                 the gradient clipped, each group's lr its initial_lr times lr_multiplier(step)
    the cadence  validation loss, samples and checkpoints every N steps and at the end;
                 SIGTERM or Ctrl-C checkpoints the step in flight and stops (model/stopping.py)
    outputs      log.jsonl (MetricsLog), checkpoints/, then loss.png and manifest.json

A checkpoint holds the model, the optimizer, the step, the loader's position and every rank's
RNG states, so on the CPU a resumed run's losses equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from model.evaluate import val_loss
from model.gpt import PEAK_BF16_FLOPS
from model.optim import build_optimizer, lr_multiplier
from model.stopping import GracefulStop
from pipeline.files import WorkFolder, atomic_write_json, remove_stale_temps

log = logging.getLogger("model.runtime")

ProgressFn = Callable[[int, int], None]
MicroBatch = tuple[torch.Tensor, torch.Tensor, float]  # inputs, targets, weight in the loss

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the first match wins.
PEAK_FLOPS: list[tuple[str, float]] = [("H100 PCIe", 756e12), *PEAK_BF16_FLOPS.items()]


# ---------------------------------------------------------------- the process


@dataclasses.dataclass
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we initialized the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), local, dist.get_world_size(), owns_group=False)
    if device_type == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group(backend="gloo")
    return DistInfo(rank, local, world, owns_group=True)


def resolve_device(name: str, local_rank: int = 0, section: str = "pretrain") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{section}.device is 'cuda' but no CUDA GPU is visible; set device: cpu or auto"
        )
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, for MFU; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


@dataclasses.dataclass
class Compute:
    """Where and in what precision a run computes, and what compute_cleanup() restores."""

    device: torch.device
    dtype: torch.dtype
    dist: DistInfo
    threads: int  # torch's CPU threads before compute_init
    deterministic: bool  # torch's deterministic-algorithms flag before compute_init

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast, or nothing in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def compute_init(device: str, dtype: str, num_threads: int | None, section: str) -> Compute:
    """Set up this process for training; `section` names the config section in errors."""
    dist_info = init_distributed(resolve_device(device, 0, section).type)
    where = resolve_device(device, dist_info.local_rank, section)
    compute = Compute(where, resolve_dtype(dtype, where), dist_info, torch.get_num_threads(),
                      torch.are_deterministic_algorithms_enabled())
    if num_threads:
        torch.set_num_threads(num_threads)
    if where.type == "cuda":
        torch.cuda.set_device(where)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True)  # exact resume on the CPU
    return compute


def compute_cleanup(compute: Compute) -> None:
    torch.set_num_threads(compute.threads)
    torch.use_deterministic_algorithms(compute.deterministic)
    if compute.dist.owns_group:
        dist.destroy_process_group()


# ---------------------------------------------------------------- log and plot


class MetricsLog:
    """Append-only JSON lines on rank 0, plus the terminal through logging."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a killed run's tail, to be redone); -1: all."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line, r in _parse(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _parse(path: Path) -> Iterator[tuple[str, dict]]:
    """(line, record) of each whole line of a log.jsonl; a line cut by a kill is skipped."""
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            yield line, json.loads(line)


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl (a cut last line is skipped)."""
    return [record for _, record in _parse(path)] if path.exists() else []


def plot_losses(log_path: Path, png: Path) -> Path | None:
    """Train and validation loss against step, as a PNG (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, format="png")
    os.replace(tmp, png)
    return png


# ---------------------------------------------------------------- the run


def fresh_start(work: WorkFolder, stage: str) -> None:
    """Starting over: forget a previous run's checkpoints, log and results."""
    for target in work.training_outputs(stage):
        if target.is_dir():
            log.warning("starting over: removing %s", target)
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class TrainingRun:
    """One training run of a stage: the parts common to every stage, and the loop.

    Every part keeps its own state (model, optimizer, loader, RNG); a checkpoint is their
    states side by side and load_state_dict() puts each back, so the next step is exactly the
    one an uninterrupted run would take. Subclasses set `stage` and `format` and fill in the
    hooks below the loop.
    """

    stage: str  # the work folder's stage: pipeline.files.PRETRAIN or FINETUNE
    format: str  # the checkpoint format (model/checkpoint.py)
    compile = False  # torch.compile the model
    sample_every = 0  # steps between sample() calls
    train_loader: Any  # next_batches' source, set by build(); its state is in the checkpoint

    def __init__(self, cfg: Any, workdir: Path, compute: Compute, overwrite: bool) -> None:
        self.cfg, self.compute, self.dist = cfg, compute, compute.dist
        self.device = compute.device
        self.work = WorkFolder(workdir)
        self.checkpoints = CheckpointManager(self.work.checkpoints(self.stage), cfg.keep_last)
        self.metrics = MetricsLog(self.work.training_log(self.stage), self.dist.main)
        self.resumed_from, saved = self.restart(overwrite)
        self.max_steps: int = cfg.max_steps
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.raw: torch.nn.Module = self.build(saved)
        self.model_dict = dataclasses.asdict(self.raw.config)
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.raw, cfg, self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs across ranks
        self.model: torch.nn.Module = self.raw  # what trains: compiled and/or DDP-wrapped
        self.step = 0
        self._rng: dict | None = None  # this rank's RNG states from the checkpoint
        if saved is not None:
            self.load_state_dict(saved, self.resumed_from)
            log.info("resuming from %s (step %d)", self.resumed_from, self.step)
        # the log keeps what the checkpoint covers; a killed run's later records are redone
        self.metrics.truncate_after(self.step if saved is not None else -1)

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        return self.compute.autocast

    # ------------------------------------------------------------ state

    def restart(self, overwrite: bool) -> tuple[Path | None, dict | None]:
        """The newest complete checkpoint and its state (rank 0 picks it for all), or none:
        rerunning resumes, overwrite starts over."""
        if overwrite and self.dist.main:
            fresh_start(self.work, self.stage)
        if self.dist.main and (removed := remove_stale_temps(self.work.stage(self.stage))):
            log.info("%s: removed %d temporary files of dead writers", self.stage, removed)
        if self.dist.enabled:
            dist.barrier()
        latest = self.dist.broadcast(None if overwrite else self.checkpoints.latest())
        if latest is None:
            return None, None
        return latest, load_checkpoint(latest, kind=self.format)

    def state_dict(self, rng: list[dict]) -> dict:
        """The checkpoint: every part's state, the configs and all ranks' RNG states."""
        return {"format": self.format, "version": FORMAT_VERSION, "step": self.step,
                "model": self.raw.state_dict(), **self.state_fields(),
                "optimizer": self.optimizer.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": rng,
                "model_config": self.model_dict, "max_steps": self.max_steps,
                "train_config": self.cfg.model_dump(mode="json")}

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Put a checkpoint back; a version 1 checkpoint's "scheduler" is not needed (the
        learning rate is a function of the step)."""
        self.load_fields(state, path)
        initial = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, initial, strict=True):
            group["initial_lr"] = lr  # the current config's peak learning rates
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        ranks = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(ranks) == self.dist.world_size:
            self._rng = ranks[self.dist.rank]
        else:
            log.warning("checkpoint %s holds the RNG states of %d ranks, this run has %d: dropout "
                        "masks will differ from an uninterrupted run", path, len(ranks),
                        self.dist.world_size)
        now = self.cfg.model_dump(mode="json")
        saved = state.get("train_config", {})
        changed = {k: f"{v!r} -> {now.get(k)!r}" for k, v in saved.items() if now.get(k) != v}
        if changed:
            log.warning("resuming with a changed config: %s", changed)

    def save(self) -> Path | None:
        """Checkpoint the current step (collective: every rank hands over its RNG state)."""
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_state())
        if not self.dist.main:
            return None
        return self.checkpoints.save(self.step, self.state_dict(rng))

    # ------------------------------------------------------------ the work

    def wrap(self) -> None:
        """torch.compile, then DDP around it (as nanoGPT)."""
        if self.compile:
            self.model = torch.compile(self.raw)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)

    def set_lr(self) -> float:
        """Each group's learning rate for this step; returns the first group's."""
        multiplier = lr_multiplier(self.step, self.cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, Counter]:
        """One optimizer step: (weighted mean loss, grad norm, lr, the step's counts).

        DDP all-reduces gradients only on the last micro-batch (no_sync before it).
        """
        batches, counts = self.next_batches()
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y, weight) in enumerate(batches):
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
            last = i == len(batches) - 1
            no_sync = self.dist.enabled and not last
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss * weight  # the mean over micro-batches, as one big batch
                loss.backward()
            loss_sum += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        lr = self.set_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, lr, counts

    def evaluate(self) -> float | None:
        batches = self.val_batches()
        if batches is None:
            return None
        # eager: compiling the eval graph too cost 25 s at the end of a 124M run on an H200,
        # for a few forwards that cost milliseconds each uncompiled
        loss = val_loss(self.raw, batches, self.device, self.autocast,
                        self.dist.rank, self.dist.world_size)
        self.metrics.write({"kind": "val", "step": self.step, "val_loss": loss,
                            "time": time.time()})
        log.info("step %d | val loss %.4f", self.step, loss)
        return loss

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, counts: Counter,
                 since: Counter, t_log: float, t_step: float) -> float:
        """Write the train record of this step; `since` counts what was done since t_log.
        Returns the time it was taken at."""
        if self.dist.enabled:
            dist.all_reduce(loss)  # SUM: gloo has no AVG
            loss /= self.dist.world_size
        value = float(loss)  # synchronizes the device: the timing is real
        now = time.perf_counter()
        seconds = now - t_log
        record = {"kind": "train", "step": self.step, "loss": value, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": since["tokens"] / seconds,
                  **self.record_fields(counts, since, seconds),
                  "ms_per_step": (now - t_step) * 1000, "time": time.time()}
        self.metrics.write(record)
        log.info("step %d/%d | loss %.4f | lr %.2e | norm %.2f | %.0f tok/s%s%s", self.step,
                 self.max_steps, value, lr, record["grad_norm"], record["tokens_per_s"],
                 f" | mfu {record['mfu']:.1%}" if record.get("mfu") is not None else "",
                 f" | pad {record['padding']:.0%}" if "padding" in record else "")
        return now

    def fit(self, progress: ProgressFn | None = None) -> dict:
        """Train from self.step to max_steps; evaluate, sample and checkpoint on schedule."""
        cfg, main = self.cfg, self.dist.main
        t_start, start = time.time(), self.step
        self.wrap()
        if self._rng is not None:
            set_rng_state(self._rng)
        params, trainable = self.raw.num_params(), sum(p.numel() for p in self.params)
        dtype, extra = str(self.compute.dtype).removeprefix("torch."), self.start_fields()
        self.metrics.write({"kind": "resume" if start else "start", "step": start,
                            "time": time.time(), "params": params, "trainable": trainable,
                            "world_size": self.dist.world_size, "device": str(self.device),
                            "dtype": dtype, "max_steps": self.max_steps,
                            "checkpoint": str(self.resumed_from) if self.resumed_from else None,
                            **extra})
        described = ", ".join(f"{k} {v}" for k, v in extra.items())
        log.info("%s %s: %.2fM of %.2fM parameters trained, %d steps, %s %s, %s",
                 "resuming" if start else "starting", self.stage, trainable / 1e6, params / 1e6,
                 self.max_steps, self.device, dtype, described)
        if start == 0 and cfg.eval_every:
            self.evaluate()
        last_ckpt = self.resumed_from
        timed, since = Counter(), Counter()  # counts and seconds of the timed steps; since a log
        t_log = time.perf_counter()
        self.model.train()
        if progress and main:
            progress(start, self.max_steps)

        def due(every: int) -> bool:
            return self.step == self.max_steps or bool(every and self.step % every == 0)

        with GracefulStop() as stop:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr, counts = self.train_step()
                since.update(counts)
                if due(cfg.log_every):
                    now = self.log_step(loss, grad_norm, lr, counts, since, t_log, t0)
                    if self.step > start + 1:  # the first step pays for warm-up and compilation
                        timed.update(since)
                        timed["seconds"] += now - t_log
                    t_log, since = time.perf_counter(), Counter()
                t_pause = time.perf_counter()  # evaluation, samples and saving are not training
                if self.step < self.max_steps and stop.requested(self.dist.world_size, self.device):
                    last_ckpt = self.save() or last_ckpt  # the step in flight is kept
                    break
                if due(cfg.eval_every):
                    self.evaluate()
                if due(self.sample_every):
                    self.sample()
                if due(cfg.checkpoint_every):
                    last_ckpt = self.save() or last_ckpt  # the final step always saves
                if progress and main:
                    progress(self.step, self.max_steps)
                t_log += time.perf_counter() - t_pause
        self.metrics.close()
        return self.finish(start, t_start, timed, last_ckpt, stop.name)

    def finish(self, start: int, t_start: float, timed: Counter, checkpoint: Path | None,
               stopped_by: str | None) -> dict:
        """The summary (rank 0's view, from the log) and the loss plot of the steps trained so
        far; when not stopped, the manifest, written last, so that an unfinished stage is never
        taken for done."""
        records = read_log(self.metrics.path) if self.dist.main else []
        trains = [r for r in records if r["kind"] == "train"]
        vals = [r for r in records if r["kind"] == "val"]
        summary = {
            "steps": self.step,
            "resumed_from": start or None,
            "train_loss": trains[-1]["loss"] if trains else None,
            "val_loss_before": vals[0]["val_loss"] if vals and vals[0]["step"] == 0 else None,
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "tokens_per_s": timed["tokens"] / timed["seconds"] if timed["seconds"] else None,
            "params": self.raw.num_params(),
            "trainable": sum(p.numel() for p in self.params),
            "world_size": self.dist.world_size,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "log": str(self.metrics.path),
            "plot": None,
            "stopped_by": stopped_by,
        }
        if stopped_by:
            log.warning("stopped by %s after step %d; %s holds it and rerunning continues there",
                        stopped_by, self.step, checkpoint)
        summary.update(self.summary_fields(trains, timed, checkpoint, not stopped_by))
        summary["seconds"] = round(time.time() - t_start, 2)
        if self.dist.main:  # a stopped (cancelled) run's report shows its curve too
            plot = plot_losses(self.metrics.path, self.work.loss_plot(self.stage))
            summary["plot"] = str(plot) if plot else None
        if self.dist.main and not stopped_by:
            manifest = {"stage": self.stage, "config": self.cfg.model_dump(mode="json"),
                        "model_config": self.model_dict, **self.manifest_fields(), **summary}
            atomic_write_json(self.work.manifest(self.stage), manifest)
        return summary

    # ------------------------------------------------------------ what a stage says

    def build(self, saved: dict | None) -> torch.nn.Module:
        """The data (train_loader, ...) and the model on the device; `saved` is the state of
        the checkpoint being resumed, if any; may set max_steps."""
        raise NotImplementedError

    def next_batches(self) -> tuple[list[MicroBatch], Counter]:
        """The micro-batches of one step on this rank, and its counts ("tokens": the step's
        tokens over all ranks, for tokens/s)."""
        raise NotImplementedError

    def val_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (x, y) batches of the validation loss (every rank's), or None: no validation."""
        raise NotImplementedError

    def sample(self) -> None:
        """A sample generation into the log, every sample_every steps and at the end."""

    def state_fields(self) -> dict:
        """What the stage's checkpoints hold besides the common parts (may replace "model")."""
        return {}

    def load_fields(self, state: dict, path: Path) -> None:
        """Refuse a checkpoint of another run (naming `path`), else load its model weights."""
        self.raw.load_state_dict(state["model"])

    def start_fields(self) -> dict:
        """The data and the batch: fields of the log's start record and the terminal's line."""
        return {}

    def record_fields(self, counts: Counter, since: Counter, seconds: float) -> dict:
        """Fields of a train record besides the common ones."""
        return {}

    def summary_fields(self, trains: list[dict], timed: Counter, checkpoint: Path | None,
                       finished: bool) -> dict:
        """Fields of the summary besides the common ones (and the stage's last work)."""
        return {}

    def manifest_fields(self) -> dict:
        """Fields of the manifest besides the summary: config_hash and the inputs."""
        raise NotImplementedError


def train(run_class: type[TrainingRun], cfg: Any, workdir: Path, overwrite: bool = False,
          progress: ProgressFn | None = None) -> dict:
    """Run a stage's training as cfg says; returns its summary (see TrainingRun.finish)."""
    compute = compute_init(cfg.device, cfg.dtype, cfg.num_threads, run_class.stage)
    try:
        return run_class(cfg, Path(workdir), compute, overwrite).fit(progress)
    finally:
        compute_cleanup(compute)
