"""ShardLoader: windows, epochs, DDP sharding and its resumable state, on a synthetic dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import ShardError, ShardLoader
from pipeline.shards import TokenDataset, chunk_file, write_group_attributes, write_shard
from pipeline.tokenize import dataset_attributes

VOCAB = 512
BLOCK = 16


def make_dataset(
    folder: Path,
    train_sizes: tuple[int, ...] = (1000, 777),
    val_size: int = 300,
    vocab: int = VOCAB,
    seed: int = 0,
) -> Path:
    """A token dataset in the real shard format, with learnable structure.

    Documents are runs of an arithmetic progression mod vocab (next token = previous + a
    per-document stride), so a model's loss falls well below log(vocab) within a few steps.
    The group's vocab_size is set to `vocab` so tiny test models stay tiny.
    """
    rng = np.random.default_rng(seed)
    dataset, staging = folder / "dataset.zarr", folder / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    infos = []
    for split, sizes in (("train", train_sizes), ("val", (val_size,))):
        for i, size in enumerate(sizes):
            tokens, ends = [], []
            while sum(len(t) for t in tokens) < size:
                n = int(rng.integers(20, 120))
                start, stride = int(rng.integers(0, vocab - 1)), int(rng.integers(1, 7))
                doc = (start + stride * np.arange(n)) % (vocab - 1)
                tokens.append(np.append(doc, vocab - 1))  # the last id plays end-of-text
                ends.append(sum(len(t) for t in tokens))
            flat = np.concatenate(tokens)[:size]
            ends = np.minimum(np.asarray(ends), size)
            infos.append(
                write_shard(
                    dataset,
                    staging,
                    split,
                    f"{i:06d}",
                    flat,
                    ends,
                    {"text_bytes": 0, "sources": {"synthetic": len(ends)}},
                )
            )
    attrs = dataset_attributes(infos, "test")
    attrs.update(vocab_size=vocab, eot_id=vocab - 1)
    write_group_attributes(dataset, attrs)
    shutil.rmtree(staging)
    return dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("loader"))


def windows_of(loader: ShardLoader, batches: int) -> list[np.ndarray]:
    out = []
    for _ in range(batches):
        loader.next_batch()
        out.append(loader.last_indices.copy())
    return out


def test_windows_are_the_right_tokens(dataset: Path) -> None:
    loader = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=1)
    # starts at multiples of BLOCK, start + BLOCK + 1 <= shard size: 999 // 16 + 776 // 16
    assert loader.num_windows == 62 + 48
    assert loader.batches_per_epoch == 110 // 4
    shards = [s.tokens() for s in TokenDataset(dataset).shards("train")]
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, BLOCK)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, i in enumerate(loader.last_indices):
            shard, off = loader.window_shard[i], loader.window_offset[i]
            assert off % BLOCK == 0 and off + BLOCK + 1 <= shards[shard].size  # no crossing
            expected = torch.from_numpy(shards[shard][off : off + BLOCK + 1].astype(np.int64))
            assert torch.equal(x[row], expected[:-1]) and torch.equal(y[row], expected[1:])


def test_epoch_visits_each_window_once_then_reshuffles(dataset: Path) -> None:
    loader = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=3)
    epoch0 = np.concatenate(windows_of(loader, loader.batches_per_epoch))
    assert len(np.unique(epoch0)) == len(epoch0) == loader.batches_per_epoch * 4
    assert loader.epoch == 0
    epoch1 = np.concatenate(windows_of(loader, loader.batches_per_epoch))
    assert loader.epoch == 1
    assert len(np.unique(epoch1)) == len(epoch1)
    assert not np.array_equal(epoch0, epoch1)  # a new permutation, seed + epoch
    again = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=3)
    assert np.array_equal(np.concatenate(windows_of(again, 3)), epoch0[:12])
    other = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=4)
    assert not np.array_equal(np.concatenate(windows_of(other, 3)), epoch0[:12])


def test_two_ranks_are_disjoint_and_cover_the_epoch(dataset: Path) -> None:
    ranks = [
        ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    single = ShardLoader(dataset, "train", batch_size=8, block_size=BLOCK, seed=5)
    steps = ranks[0].batches_per_epoch
    assert steps == single.batches_per_epoch == 110 // 8
    per_rank = [np.concatenate(windows_of(loader, steps)) for loader in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    both = np.concatenate(per_rank)
    assert len(np.unique(both)) == steps * 8
    # the same windows, step by step, as one process with the same global batch
    single_steps = windows_of(single, steps)
    for s in range(steps):
        together = np.concatenate([per_rank[0][s * 4 : s * 4 + 4], per_rank[1][s * 4 : s * 4 + 4]])
        assert np.array_equal(together, single_steps[s])


def test_state_round_trip_continues_exactly(dataset: Path, tmp_path: Path) -> None:
    loader = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=7)
    windows_of(loader, 25)  # two batches before the end of epoch 0: resume crosses it
    torch.save({"loader": loader.state_dict()}, tmp_path / "state.pt")
    expected = [loader.next_batch() for _ in range(10)]
    state = torch.load(tmp_path / "state.pt", weights_only=True)["loader"]
    assert state["epoch"] == 0 and state["position"] == 100
    resumed = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=7)
    resumed.load_state_dict(state)
    for x, y in expected:
        x2, y2 = resumed.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.epoch == loader.epoch == 1


def test_state_for_other_windows_is_refused(dataset: Path) -> None:
    state = ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=7).state_dict()
    with pytest.raises(ValueError, match="block_size=16"):
        ShardLoader(dataset, "train", batch_size=4, block_size=8, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7"):
        ShardLoader(dataset, "train", batch_size=4, block_size=BLOCK, seed=8).load_state_dict(state)


def test_eval_batches_are_fixed(dataset: Path) -> None:
    val = ShardLoader(dataset, "val", batch_size=4, block_size=BLOCK, shuffle=False)
    assert val.num_windows == 299 // BLOCK == 18
    first = list(val.first_batches(3))
    val.next_batch()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, val.first_batches(3), strict=True))
    assert [b[0].shape[0] for b in val.first_batches(100)] == [4, 4, 4, 4, 2]  # short tail
    tokens = TokenDataset(dataset).shards("val")[0].tokens()
    assert torch.equal(
        first[1][0][0], torch.from_numpy(tokens[4 * BLOCK : 5 * BLOCK].astype(np.int64))
    )


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_bad_shard_names_the_file(dataset: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "dataset.zarr"
    shutil.copytree(dataset, copy)
    chunk = chunk_file(copy / "train" / "000001")
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:100])
    else:
        chunk.unlink()
    with pytest.raises(ShardError, match=str(chunk)):
        ShardLoader(copy, "train", batch_size=4, block_size=BLOCK)
