"""Training batches from memory-mapped token shards.

The split is cut into windows of block_size + 1 tokens whose starts are multiples of
block_size inside each shard (consecutive windows share one token: the last target of one is
the first input of the next), never crossing a shard's end. Every window of the split is an
(shard, offset) pair; each epoch visits all of them once, in a permutation drawn from
numpy's Generator seeded with seed + epoch, so the order depends on nothing but the seed.

Under DDP one global batch is world_size * batch_size consecutive windows of the permutation
and rank r takes the r-th contiguous slice: ranks never overlap and together they read
exactly what one process with the same global batch reads. An epoch's tail that cannot fill a
global batch is skipped. The loader's whole state is (epoch, position): a checkpoint stores it
and resume continues with the very next window.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.shards import TOKEN_DTYPE, Shard, TokenDataset, chunk_file


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupt; the message names the file."""


def check_shards(dataset: TokenDataset, split: str | None = None) -> None:
    """Cheap integrity check before training: every chunk file exists with the recorded size."""
    for shard in dataset.shards(split):
        path = chunk_file(shard.path)
        expected = int(shard.info["tokens"]) * TOKEN_DTYPE.itemsize
        if not path.is_file():
            raise ShardError(
                f"shard {shard.split}/{shard.name} is missing: {path} does not exist; "
                "rerun `forge tokenize` (it rewrites missing shards)"
            )
        size = path.stat().st_size
        if size != expected:
            raise ShardError(
                f"shard {shard.split}/{shard.name} is corrupt: {path} has {size} bytes, its "
                f"record says {expected}; rerun `forge tokenize` or `forge verify`"
            )


class ShardLoader:
    """(x, y) int64 batches of shape (batch_size, block_size) from one split of a dataset.

    shuffle=False keeps the windows in storage order (evaluation); rank/world_size shard the
    global batch across DDP processes.
    """

    def __init__(
        self,
        dataset: TokenDataset | str | Path,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset = dataset if isinstance(dataset, TokenDataset) else TokenDataset(dataset)
        self.split = split
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        shards = self.dataset.shards(split)
        check_shards(self.dataset, split)
        self.shards: list[Shard] = shards
        # plain ndarray views of the memmaps: zero copy, paged in lazily, and slicing them
        # skips np.memmap's per-slice bookkeeping (a third of a small batch's time)
        self._tokens = [np.asarray(s.tokens()) for s in shards]
        # windows per shard: starts 0, T, 2T, ... with start + T + 1 <= n
        counts = [max(0, (t.size - 1) // block_size) for t in self._tokens]
        self.window_shard = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        self.window_offset = np.concatenate(
            [np.arange(c, dtype=np.int64) * block_size for c in counts] or [np.zeros(0, np.int64)]
        )
        self.num_windows = int(self.window_shard.size)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        self.epoch = 0
        self.position = 0  # windows of this epoch's order already consumed, by all ranks
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self.last_indices: np.ndarray = np.zeros(0, dtype=np.int64)  # window ids of last batch

    def __repr__(self) -> str:
        return (
            f"ShardLoader({self.split}: {self.num_windows} windows of {self.block_size + 1} "
            f"tokens in {len(self.shards)} shards, batch {self.batch_size} x {self.world_size} "
            f"ranks, epoch {self.epoch}, position {self.position})"
        )

    def order(self, epoch: int) -> np.ndarray:
        """Window ids in the order epoch `epoch` visits them."""
        if self._order_epoch != epoch or self._order is None:
            if self.shuffle:
                rng = np.random.default_rng(self.seed + epoch)
                self._order = rng.permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch; rolls over to a new epoch when needed."""
        if self.batches_per_epoch == 0:
            raise ShardError(
                f"the {self.split} split has {self.num_windows} windows of {self.block_size + 1} "
                f"tokens, fewer than one global batch of {self.global_batch}; use a smaller "
                "micro_batch_size or block_size, or more data"
            )
        if self.position + self.global_batch > self.num_windows:
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.batch_size
        ids = self.order(self.epoch)[start : start + self.batch_size]
        self.position += self.global_batch
        return self._gather(ids)

    def first_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first n batches of batch_size windows in storage order, whatever the state.

        Deterministic evaluation batches: the same windows on every rank and every call; the
        last one is short if the split holds fewer than n full batches.
        """
        total = min(n * self.batch_size, self.num_windows)
        for start in range(0, total, self.batch_size):
            yield self._gather(np.arange(start, min(start + self.batch_size, total)))

    def _gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the windows straight into x and y (bench/loader_throughput.py measures it)."""
        self.last_indices = np.asarray(ids, dtype=np.int64)
        T = self.block_size
        x = np.empty((len(ids), T), dtype=np.int64)
        y = np.empty((len(ids), T), dtype=np.int64)
        shards = self.window_shard[self.last_indices].tolist()
        offsets = self.window_offset[self.last_indices].tolist()
        for row, (shard, off) in enumerate(zip(shards, offsets, strict=True)):
            tokens = self._tokens[shard]
            x[row] = tokens[off : off + T]
            y[row] = tokens[off + 1 : off + T + 1]
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict:
        """Where the loader stands; plain ints, so torch.load(weights_only=True) reads it."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "block_size": self.block_size,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; refuses a state made for other data or windows."""
        for key in ("seed", "block_size", "num_windows"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"loader state was made with {key}={state[key]}, this loader has "
                    f"{key}={getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
