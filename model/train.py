"""Pretraining: the loop of nanoGPT's train.py, on the shared runtime (model/runtime.py).

run_pretrain() trains a GPT on a token dataset into <workdir>/pretrain/:

    log.jsonl          one JSON record per logged step, validation loss and sample
    checkpoints/       ckpt-NNNNNN.pt + .json sidecars (model/checkpoint.py), the newest K
    loss.png           the loss curve, drawn at the end
    manifest.json      config, dataset fingerprint and the summary, written last

One process, or one per GPU under torchrun (DDP; NCCL on CUDA, gloo on the CPU). Each
optimizer step takes total_batch_tokens tokens: micro-batches accumulated on every rank.
Pretraining's own parts are its data (windows of the token shards, every target counted),
the dataset checks and the sample generations; the runtime does the rest, resume included:
rerunning continues from the newest complete checkpoint, `--overwrite` starts over.

    forge pretrain --config configs/demo.yaml [--workdir DIR] [--overwrite]
    torchrun --standalone --nproc_per_node=8 -m cli.main pretrain --config configs/gpt2-124m.yaml
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import PRETRAIN_FORMAT, check_compatible
from model.config import PretrainConfig, PretrainConfigError
from model.data import ShardError, ShardLoader, check_shards
from model.generate import Engine, Request, SamplingParams
from model.gpt import GPT
from model.runtime import DistInfo, MicroBatch, ProgressFn, TrainingRun, log, peak_flops, train
from pipeline.files import PRETRAIN, config_hash
from pipeline.shards import TokenDataset, verify


def sample_text(
    model: GPT,
    prompt_ids: list[int],
    cfg: PretrainConfig,
    step: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    encoding: Any,
) -> str:
    """One generation from the prompt, seeded by the step: the training RNG is untouched."""
    was_training = model.training
    params = SamplingParams(max_tokens=cfg.sample_tokens, temperature=1.0, top_k=200, top_p=1.0,
                            frequency_penalty=0.0, seed=cfg.seed + step)
    prompt = prompt_ids[-(model.config.block_size - 1) :]
    with autocast:
        (done,) = Engine(model, encoding, device).generate([Request(prompt, params)])
    model.train(was_training)
    return done.text


def _check_data(dataset: TokenDataset, cfg: PretrainConfig, dist_info: DistInfo) -> None:
    """Fail before training on a missing, truncated or corrupt shard, naming it."""
    check_shards(dataset)
    if not cfg.verify_data:
        return
    problems = dist_info.broadcast(verify(dataset.path) if dist_info.main else [])
    if problems:
        raise ShardError(f"dataset {dataset.path} failed verification: " + "; ".join(problems))


def _encoder(cfg: PretrainConfig) -> tuple[list[int], Any]:
    """The sample prompt's tokens and the encoding; fails fast if the vocabulary is missing."""
    from pipeline.encoding import EOT_ID, get_encoding

    enc = get_encoding(cfg.vocab_dir)
    ids = enc.encode(cfg.sample_prompt, allowed_special="all") or [EOT_ID]
    return ids, enc


class Pretraining(TrainingRun):
    """A pretraining run: windows of the token dataset, every target counted, and samples."""

    stage = PRETRAIN
    format = PRETRAIN_FORMAT

    def build(self, saved: dict | None) -> torch.nn.Module:
        cfg, dist_info = self.cfg, self.dist
        # data first: a bad dataset fails before any model is built
        dataset = cfg.dataset_path(self.work.root)
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
        gpt_config = cfg.gpt_config(data_vocab)
        self.block = gpt_config.block_size
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
            log.warning("the val split of %s has no window of %d tokens: no validation loss",
                        self.dataset.path, T + 1)
        self.sample_prompt: list[int] = []
        self.encoding: Any = None
        if cfg.sample_every:  # every rank: a missing vocabulary fails them all, not just rank 0
            self.sample_prompt, self.encoding = _encoder(cfg)
        self.compile, self.sample_every = cfg.compile, cfg.sample_every
        self.peak = peak_flops(self.device)
        return GPT(gpt_config).to(self.device)

    def next_batches(self) -> tuple[list[MicroBatch], Counter]:
        batches = [(*self.train_loader.next_batch(), 1 / self.accum) for _ in range(self.accum)]
        return batches, Counter(tokens=self.cfg.total_batch_tokens)

    def val_batches(self) -> Any:
        return self.val_loader.first_batches(self.eval_batches) if self.eval_batches else None

    def sample(self) -> None:
        if self.encoding is None or not self.dist.main:
            return
        text = sample_text(self.raw, self.sample_prompt, self.cfg, self.step, self.device,
                           self.autocast, self.encoding)
        self.metrics.write({"kind": "sample", "step": self.step, "prompt": self.cfg.sample_prompt,
                            "text": text, "time": time.time()})
        log.info("step %d | sample: %r", self.step, self.cfg.sample_prompt + text)

    def state_fields(self) -> dict:
        return {"dataset_fingerprint": self.fingerprint}

    def load_fields(self, state: dict, path: Path) -> None:
        check_compatible(state, path, self.model_dict, self.fingerprint)
        self.raw.load_state_dict(state["model"])

    def start_fields(self) -> dict:
        return {"micro_batch_size": self.cfg.micro_batch_size, "grad_accum": self.accum,
                "tokens_per_step": self.cfg.total_batch_tokens, "loader": str(self.train_loader)}

    def record_fields(self, counts: Counter, since: Counter, seconds: float) -> dict:
        per_device = since["tokens"] / seconds / self.dist.world_size
        mfu = self.raw.mfu(per_device, self.peak, self.block) if self.peak else None
        return {"tokens": self.step * self.cfg.total_batch_tokens, "mfu": mfu}

    def summary_fields(self, trains: list[dict], timed: Counter, checkpoint: Path | None,
                       finished: bool) -> dict:
        return {"tokens": self.step * self.cfg.total_batch_tokens}

    def manifest_fields(self) -> dict:
        return {"config_hash": config_hash(self.cfg, self.fingerprint),
                "dataset": str(self.dataset.path), "dataset_fingerprint": self.fingerprint}


def run_pretrain(cfg: PretrainConfig, workdir: Path, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> dict:
    """Pretrain as cfg says into <workdir>/pretrain; returns a summary dict (rank 0's view).

    Continues from the newest complete checkpoint (a finished run returns at once); overwrite
    deletes the previous run's checkpoints and log and starts over. Under torchrun every rank
    calls this; rank 0 alone writes the log and the checkpoints.
    """
    return train(Pretraining, cfg, workdir, overwrite, progress)
