"""Pretraining: the loop of nanoGPT's train.py, made of separate stateful parts.

run_pretrain() trains a GPT on a token dataset into <workdir>/pretrain/:

    log.jsonl          one JSON record per logged step, validation loss and sample
    checkpoints/       ckpt-NNNNNN.pt + .json sidecars (model/checkpoint.py), the newest K
    loss.png           the loss curve, drawn at the end
    manifest.json      config, dataset fingerprint and the summary, written last

One process, or one per GPU under torchrun (DDP; NCCL on CUDA, gloo on the CPU). Each
optimizer step takes total_batch_tokens tokens: micro-batches accumulated on every rank, with
DDP's gradient all-reduce only after the last (no_sync). A restart resumes from the newest
complete checkpoint: model, AdamW moments, schedule position, loader position and every RNG
state come back, so on the CPU the resumed run's losses equal the uninterrupted run's exactly.

    forge pretrain --config configs/demo.yaml [--workdir DIR]
    torchrun --standalone --nproc_per_node=8 -m cli.main pretrain --config configs/gpt2-124m.yaml
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model.checkpoint import (
    CheckpointManager,
    check_compatible,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from model.config import PretrainConfig, PretrainConfigError
from model.data import ShardError, ShardLoader, check_shards
from model.gpt import GPT, PEAK_BF16_FLOPS
from model.stopping import GracefulStop
from pipeline.files import PRETRAIN, WorkFolder, atomic_write_json, config_hash
from pipeline.shards import TokenDataset, verify

log = logging.getLogger("model.train")

ProgressFn = Callable[[int, int], None]

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the first match wins.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    *PEAK_BF16_FLOPS.items(),
]


# ---------------------------------------------------------------- hardware and processes


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PretrainConfigError(
            "pretrain.device is 'cuda' but no CUDA GPU is visible; set device: cpu or auto"
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


# ---------------------------------------------------------------- schedule and log


class WarmupCosine:
    """Linear warmup to lr over warmup_steps, then cosine down to min_lr at max_steps.

    Stateful like torch's schedulers: step() sets the lr of the next optimizer step on the
    optimizer's groups and advances; its state is the number of steps taken.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        min_lr: float,
        warmup_steps: int,
        max_steps: int,
    ) -> None:
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.max_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)

    def step(self) -> float:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.step_count += 1
        return lr

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "lr": self.lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "max_steps": self.max_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the shape of the curve comes from the current config."""
        self.step_count = int(state["step"])


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
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= step:
                keep.append(line)
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


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl (a cut last line is skipped)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


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


# ---------------------------------------------------------------- evaluation and samples


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: ShardLoader,
    batches: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    dist_info: DistInfo,
) -> float:
    """Mean loss per window over the first `batches` val batches, split across the ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, windows
    for i, (x, y) in enumerate(loader.first_batches(batches)):
        if i % dist_info.world_size != dist_info.rank:
            continue
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total[0] += loss.double() * x.size(0)
        total[1] += x.size(0)
    if dist_info.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


@torch.no_grad()
def sample_text(
    model: GPT,
    prompt_ids: list[int],
    cfg: PretrainConfig,
    step: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    decode: Callable[[list[int]], str],
) -> str:
    """One generation from the prompt, with its own generator: the training RNG is untouched."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + step)
    idx = torch.tensor([prompt_ids[-model.config.block_size :]], device=device)
    with autocast:
        out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=200, generator=gen)
    model.train(was_training)
    return decode(out[0, idx.size(1) :].tolist())


# ---------------------------------------------------------------- the run


def _check_data(dataset: TokenDataset, cfg: PretrainConfig, dist_info: DistInfo) -> None:
    """Fail before training on a missing, truncated or corrupt shard, naming it."""
    check_shards(dataset)
    if not cfg.verify_data:
        return
    problems = verify(dataset.path) if dist_info.main else []
    if dist_info.enabled:
        box: list[Any] = [problems]
        dist.broadcast_object_list(box, src=0)
        problems = box[0]
    if problems:
        raise ShardError(f"dataset {dataset.path} failed verification: " + "; ".join(problems))


def _encoder(cfg: PretrainConfig) -> tuple[list[int], Callable[[list[int]], str]]:
    """The sample prompt's tokens and the decoder; fails fast if the vocabulary is missing."""
    from pipeline.encoding import EOT_ID, get_encoding

    enc = get_encoding(cfg.vocab_dir)
    ids = enc.encode(cfg.sample_prompt, allowed_special="all") or [EOT_ID]
    return ids, enc.decode


def fresh_start(work: WorkFolder, stage: str) -> None:
    """Starting over: forget a previous run's checkpoints, log and results."""
    for target in work.training_outputs(stage):
        if target.is_dir():
            log.warning("starting over: removing %s", target)
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class Trainer:
    """One pretraining run: its parts, built from the config, and the loop that drives them.

    Every part keeps its own state (model, optimizer, schedule, loader, RNG); a checkpoint is
    their state_dicts side by side and resume() puts each back, so the next step is exactly
    the one an uninterrupted run would take.
    """

    def __init__(self, cfg: PretrainConfig, workdir: Path, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.work = WorkFolder(workdir)
        self.device = resolve_device(cfg.device, dist_info.local_rank)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        else:
            torch.use_deterministic_algorithms(True)  # exact resume on the CPU
        self.autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )

        # data first: a bad dataset fails before any model is built
        dataset = cfg.dataset_path(workdir)
        if not cfg.dataset and not (dataset / "zarr.json").exists():
            raise ShardError(f"no token dataset at {dataset}: run `forge prepare --config "
                             "YOUR_CONFIG` first (its tokenize stage writes it), or set "
                             "pretrain.dataset to an existing dataset.zarr")
        try:
            self.dataset = TokenDataset(dataset)
        except ValueError as e:
            raise ShardError(str(e)) from None
        _check_data(self.dataset, cfg, dist_info)
        data_vocab = int(self.dataset.attrs["vocab_size"])
        if cfg.vocab_size is not None and cfg.vocab_size < data_vocab:
            raise PretrainConfigError(
                f"pretrain.vocab_size {cfg.vocab_size} is smaller than the dataset's "
                f"vocabulary ({data_vocab}); raise it or unset it"
            )
        self.gpt_config = cfg.gpt_config(data_vocab)
        self.model_dict = dataclasses.asdict(self.gpt_config)
        self.block = self.gpt_config.block_size
        self.accum = cfg.grad_accum_steps(dist_info.world_size, self.block)
        self.fingerprint = str(self.dataset.attrs["fingerprint"])
        B, T = cfg.micro_batch_size, self.block
        self.train_loader = ShardLoader(
            self.dataset, "train", B, T, cfg.seed, dist_info.rank, dist_info.world_size
        )
        if self.train_loader.batches_per_epoch == 0:
            raise ShardError(
                f"the train split of {self.dataset.path} has {self.train_loader.num_windows} "
                f"windows of {T + 1} tokens, fewer than one global micro-batch of "
                f"{self.train_loader.global_batch}; lower pretrain.micro_batch_size or block_size"
            )
        self.val_loader = ShardLoader(self.dataset, "val", B, T, shuffle=False)
        self.eval_batches = cfg.eval_batches if self.val_loader.num_windows else 0
        if not self.eval_batches:
            log.warning(
                "the val split of %s has no window of %d tokens: no validation loss",
                self.dataset.path,
                T + 1,
            )
        self.sample_prompt: list[int] = []
        self.decode: Callable[[list[int]], str] | None = None
        if cfg.sample_every:  # every rank: a missing vocabulary fails them all, not just rank 0
            self.sample_prompt, self.decode = _encoder(cfg)

        # model, optimizer, schedule: the same initial weights on every rank
        seed_everything(cfg.seed)
        self.raw = GPT(self.gpt_config).to(self.device)
        self.optimizer = self.raw.configure_optimizer(
            cfg.weight_decay, cfg.lr, tuple(cfg.betas), self.device.type
        )
        self.scheduler = WarmupCosine(
            self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps
        )
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout differs across ranks
        self.model: torch.nn.Module = self.raw  # what trains: compiled and/or DDP-wrapped
        self.eval_model: torch.nn.Module = self.raw  # compiled, never DDP
        self.checkpoints = CheckpointManager(self.work.checkpoints(PRETRAIN), cfg.keep_last)
        self.metrics = MetricsLog(self.work.training_log(PRETRAIN), dist_info.main)
        self.step = 0
        self.resumed_from: Path | None = None
        self._rng: dict | None = None  # this rank's RNG states from the checkpoint

    # ------------------------------------------------------------ state

    def state_dict(self, rng: list[dict]) -> dict:
        """The checkpoint: every part's state, the configs, the dataset and all ranks' RNG."""
        return {
            "format": "forge-pretrain-checkpoint",
            "version": 1,
            "step": self.step,
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": rng,
            "model_config": self.model_dict,
            "dataset_fingerprint": self.fingerprint,
            "train_config": self.cfg.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        check_compatible(state, path, self.model_dict, self.fingerprint)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        ranks = state["rng"]
        if len(ranks) == self.dist.world_size:
            self._rng = ranks[self.dist.rank]
        else:
            log.warning(
                "checkpoint %s holds the RNG states of %d ranks, this run has %d: "
                "dropout masks will differ from an uninterrupted run",
                path,
                len(ranks),
                self.dist.world_size,
            )
        now = self.cfg.model_dump(mode="json")
        changed = {
            k: f"{v!r} -> {now.get(k)!r}"
            for k, v in state.get("train_config", {}).items()
            if now.get(k) != v
        }
        if changed:
            log.warning("resuming with a changed config: %s", changed)

    def resume(self, resume: bool = True) -> Path | None:
        """Load the newest complete checkpoint (rank 0 picks it for all), or start fresh."""
        if not resume and self.dist.main:
            fresh_start(self.work, PRETRAIN)
        if self.dist.enabled:
            dist.barrier()
        latest = self.checkpoints.latest() if resume else None
        if self.dist.enabled:
            box: list[Any] = [latest]
            dist.broadcast_object_list(box, src=0)
            latest = box[0]
        if latest is not None:
            self.load_state_dict(load_checkpoint(latest, map_location="cpu"), latest)
            log.info("resuming from %s (step %d)", latest, self.step)
        # the log keeps what the checkpoint covers; a killed run's later records are redone
        self.metrics.truncate_after(self.step if latest is not None else -1)
        self.resumed_from = latest
        return latest

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
        if self.cfg.compile:
            self.model = self.eval_model = torch.compile(self.raw)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over accum micro-batches: (mean loss, grad norm, lr), on device.

        DDP all-reduces gradients only on the last micro-batch (no_sync before it).
        """
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.train_loader.next_batch()
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
            last = micro == self.accum - 1
            sync = (
                self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            )
            with sync:
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss / self.accum  # the mean over micro-batches, as one big batch
                loss.backward()
            loss_sum += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        lr = self.scheduler.step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, lr

    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        loss = evaluate(
            self.eval_model,
            self.val_loader,
            self.eval_batches,
            self.device,
            self.autocast,
            self.dist,
        )
        self.metrics.write(
            {"kind": "val", "step": self.step, "val_loss": loss, "time": time.time()}
        )
        log.info("step %d | val loss %.4f", self.step, loss)
        return loss

    def sample(self) -> str | None:
        if self.decode is None or not self.dist.main:
            return None
        text = sample_text(
            self.raw,
            self.sample_prompt,
            self.cfg,
            self.step,
            self.device,
            self.autocast,
            self.decode,
        )
        self.metrics.write(
            {
                "kind": "sample",
                "step": self.step,
                "prompt": self.cfg.sample_prompt,
                "text": text,
                "time": time.time(),
            }
        )
        log.info("step %d | sample: %r", self.step, self.cfg.sample_prompt + text)
        return text

    def fit(self, progress: ProgressFn | None = None) -> dict:
        """Train from self.step to max_steps; evaluate, sample and checkpoint on schedule."""
        cfg, main = self.cfg, self.dist.main
        t_start, start = time.time(), self.step
        self.wrap()
        if self._rng is not None:
            set_rng_state(self._rng)
        n_params = self.raw.num_params()
        peak = peak_flops(self.device)
        tokens_per_step = cfg.total_batch_tokens
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.metrics.write(
            {
                "kind": "resume" if start else "start",
                "step": start,
                "time": time.time(),
                "params": n_params,
                "world_size": self.dist.world_size,
                "grad_accum": self.accum,
                "device": str(self.device),
                "dtype": dtype_name,
                "tokens_per_step": tokens_per_step,
                "checkpoint": str(self.resumed_from) if self.resumed_from else None,
            }
        )
        log.info(
            "%s: %.2fM parameters, %d x %d x %d x %d = %d tokens per step, %s %s, %s",
            "resuming" if start else "training",
            n_params / 1e6,
            cfg.micro_batch_size,
            self.block,
            self.accum,
            self.dist.world_size,
            tokens_per_step,
            self.device,
            dtype_name,
            self.train_loader,
        )

        val_loss = self.evaluate() if start == 0 and cfg.eval_every else None
        evaluated_at = 0 if val_loss is not None else -1
        train_loss: float | None = None
        last_ckpt = self.resumed_from
        timed_tokens, timed_seconds = 0, 0.0
        t_log, tokens_since_log = time.perf_counter(), 0
        self.model.train()
        if progress and main:
            progress(start, cfg.max_steps)

        with GracefulStop() as stop:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss_sum, grad_norm, lr = self.train_step()
                done = self.step
                tokens_since_log += tokens_per_step
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    if self.dist.enabled:
                        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
                        loss_sum /= self.dist.world_size
                    train_loss = float(loss_sum)  # synchronizes the device: the timing is real
                    now = time.perf_counter()
                    tok_s = tokens_since_log / (now - t_log)
                    if done > start + 1:  # the first step pays for warm-up and compilation
                        timed_tokens += tokens_since_log
                        timed_seconds += now - t_log
                    per_device = tok_s / self.dist.world_size
                    mfu = self.raw.mfu(per_device, peak, self.block) if peak else None
                    self.metrics.write(
                        {
                            "kind": "train",
                            "step": done,
                            "loss": train_loss,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "tokens": done * tokens_per_step,
                            "tokens_per_s": tok_s,
                            "mfu": mfu,
                            "ms_per_step": (now - t0) * 1000,
                            "time": time.time(),
                        }
                    )
                    log.info(
                        "step %d/%d | loss %.4f | lr %.2e | norm %.2f | %.0f tok/s%s",
                        done,
                        cfg.max_steps,
                        train_loss,
                        lr,
                        float(grad_norm),
                        tok_s,
                        f" | mfu {mfu:.1%}" if mfu is not None else "",
                    )
                    t_log, tokens_since_log = time.perf_counter(), 0
                t_pause = time.perf_counter()  # evaluation, samples and saving are not training
                final = done == cfg.max_steps
                if not final and stop.requested(self.dist.world_size, self.device):
                    last_ckpt = self.save() or last_ckpt  # the step in flight is kept
                    break
                if final or (cfg.eval_every and done % cfg.eval_every == 0):
                    val_loss, evaluated_at = self.evaluate(), done
                if final or (cfg.sample_every and done % cfg.sample_every == 0):
                    self.sample()
                if final or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    last_ckpt = self.save() or last_ckpt  # the final step always saves
                if progress and main:
                    progress(done, cfg.max_steps)
                t_log += time.perf_counter() - t_pause
        self.metrics.close()

        records = read_log(self.metrics.path) if main else []
        if train_loss is None:  # a finished run, resumed: report from its log
            train_loss = next((r["loss"] for r in reversed(records) if r["kind"] == "train"), None)
        if evaluated_at < 0:
            val_loss = next((r["val_loss"] for r in reversed(records) if r["kind"] == "val"), None)
        summary = {
            "steps": self.step,
            "resumed_from": start or None,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
            "tokens": self.step * tokens_per_step,
            "params": n_params,
            "world_size": self.dist.world_size,
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "log": str(self.metrics.path),
            "plot": None,
            "seconds": round(time.time() - t_start, 2),
            "stopped_by": stop.name,
        }
        if stop.name:  # unfinished: no manifest, so the stage is not taken for done
            log.warning(
                "stopped by %s after step %d; %s holds it and the next run resumes there",
                stop.name,
                self.step,
                last_ckpt,
            )
        elif main:
            plot = plot_losses(self.metrics.path, self.work.loss_plot(PRETRAIN))
            summary["plot"] = str(plot) if plot else None
            atomic_write_json(
                self.work.manifest(PRETRAIN),
                {
                    "stage": "pretrain",
                    "config_hash": config_hash(cfg, self.fingerprint),
                    "dataset": str(self.dataset.path),
                    "dataset_fingerprint": self.fingerprint,
                    "model_config": self.model_dict,
                    "config": cfg.model_dump(mode="json"),
                    **summary,
                },
            )
        return summary


def run_pretrain(
    cfg: PretrainConfig, workdir: Path, resume: bool = True, progress: ProgressFn | None = None
) -> dict:
    """Pretrain as cfg says into <workdir>/pretrain; returns a summary dict (rank 0's view).

    resume=True continues from the newest complete checkpoint (a finished run returns at once);
    resume=False deletes the previous run's checkpoints and log and starts over. Under torchrun
    every rank calls this; rank 0 alone writes the log and the checkpoints.
    """
    dist_info = init_distributed(resolve_device(cfg.device).type)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        trainer = Trainer(cfg, Path(workdir), dist_info)
        trainer.resume(resume)
        return trainer.fit(progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if dist_info.owns_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------- command line
