"""Pretraining: config, schedule, checkpoints, exact resume after SIGKILL, and DDP under torchrun.

Everything runs a tiny GPT (2 layers, width 64, a 512-token vocabulary) on a synthetic dataset
in the real shard format (see test_loader.make_dataset), on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import dead_writer_temp
from test_loader import make_dataset

from configs.run import load_training_section, validate_training_section
from model.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from model.config import PretrainConfig, PretrainConfigError
from model.data import ShardError
from model.gpt import GPT
from model.optim import build_optimizer, lr_multiplier
from model.runtime import read_log
from model.train import run_pretrain
from pipeline.files import temp_path_for
from pipeline.shards import chunk_file

REPO = Path(__file__).resolve().parents[1]

# 2 x 8 x 64 = 1024 tokens per step: 2 micro-batches on one process, 1 on each of 2 ranks
TINY = dict(
    preset="tiny",
    block_size=64,
    micro_batch_size=8,
    total_batch_tokens=1024,
    warmup_steps=5,
    lr=3e-3,
    min_lr=3e-4,
    eval_batches=4,
    num_threads=1,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("train-data"), train_sizes=(30_000, 30_000), val_size=3_000
    )


def tiny_config(dataset: Path, **overrides) -> PretrainConfig:
    base = dict(TINY)
    if overrides.get("recipe") == "modern":  # lr and min_lr are the gpt2 recipe's
        del base["lr"], base["min_lr"]
    return PretrainConfig(**{**base, "dataset": str(dataset), **overrides})


def write_yaml(path: Path, workdir: Path, cfg: PretrainConfig) -> Path:
    path.write_text(
        yaml.safe_dump(
            {"workdir": str(workdir), "pretrain": cfg.model_dump(mode="json", exclude_unset=True)}
        )
    )
    return path


def train_records(workdir: Path) -> dict[int, dict]:
    return {
        r["step"]: r for r in read_log(workdir / "pretrain" / "log.jsonl") if r["kind"] == "train"
    }


def last_step(workdir: Path) -> int:
    """The step of the last complete train record; cheap enough to poll."""
    path = workdir / "pretrain" / "log.jsonl"
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith('{"kind": "train"') and line.endswith("}"):
            return json.loads(line)["step"]
    return 0


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------- config and schedule


def test_batch_that_does_not_divide_fails_naming_the_fields() -> None:
    with pytest.raises(PretrainConfigError) as info:
        validate_training_section(
            "pretrain", {"preset": "small", "micro_batch_size": 8, "total_batch_tokens": 3000})
    message = str(info.value)
    assert "total_batch_tokens" in message and "micro_batch_size" in message and "2048" in message
    cfg = PretrainConfig(preset="small", micro_batch_size=8, total_batch_tokens=4096)
    assert cfg.grad_accum_steps(world_size=1) == 2 and cfg.grad_accum_steps(world_size=2) == 1
    with pytest.raises(PretrainConfigError, match="world size"):
        cfg.grad_accum_steps(world_size=3)


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"lrr": 1e-3}, "unknown field 'pretrain.lrr'"),
        ({"preset": "huge"}, "preset 'huge' is unknown"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"),
        ({"n_embd": 100, "n_head": 3}, "not divisible"),
        ({"micro_batch_size": 0}, "pretrain.micro_batch_size"),
        ({"device": "tpu"}, "pretrain.device"),
        ({"recipe": "llama"}, "pretrain.recipe"),
        ({"matrix_lr": 0.01}, "matrix_lr belong to the modern recipe.*set recipe: modern"),
        ({"recipe": "modern", "lr": 0.01}, "lr belong to the gpt2 recipe.*set recipe: gpt2"),
    ],
)
def test_bad_config_is_refused(section: dict, needle: str) -> None:
    with pytest.raises(PretrainConfigError, match=needle):
        validate_training_section("pretrain", section)


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_a_whole_config_written_out_reads_back(recipe: str) -> None:
    """The flows hand the trainer the whole config (every field, the other recipe's included)."""
    cfg = PretrainConfig(preset="tiny", recipe=recipe)
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_modern_optimizer_groups_and_schedule() -> None:
    """Muon on the blocks' matrices, AdamW with its own rate for embeddings, head and gains;
    warmup, a constant stretch, then a linear decay to 0 over the last cooldown_frac."""
    cfg = PretrainConfig(preset="tiny", recipe="modern", warmup_steps=2, cooldown_frac=0.5)
    model = GPT(cfg.gpt_config(512))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [g["initial_lr"] for g in groups.values()] == [0.02, 0.3, 0.008, 0.04]
    assert isinstance(optimizer.optimizers[0], torch.optim.Muon)
    matrices = groups["matrix"]["params"]
    assert all(p.dim() == 2 for p in matrices) and len(matrices) == 8  # 4 per block
    assert groups["head"]["params"] == [model.lm_head.weight]
    assert [lr_multiplier(s, cfg, 10) for s in (0, 1, 2, 5, 6, 8, 9, 10)] == [
        0.5, 1.0, 1.0, 1.0, 0.8, 0.4, 0.2, 0.0]
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="pretrain.recipe modern trains the blocks' 2-D matrices"
                       " with Muon, and this model has none that are trainable; use pretrain."
                       "recipe: gpt2"):
        build_optimizer(model, cfg, torch.device("cpu"))


def test_yaml_section_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workdir": "runs/x",
                "data": {"tokenize": {"vocab_dir": "v"}},
                "pretrain": {"preset": "small", "max_steps": 5, "warmup_steps": 1},
            }
        )
    )
    workdir, cfg = load_training_section(path, "pretrain")
    assert workdir == Path("runs/x") and cfg.max_steps == 5 and cfg.vocab_dir == "v"
    assert cfg.dataset_path(workdir) == Path("runs/x/tokenize/dataset.zarr")
    assert cfg.gpt_config(50257).block_size == 256 and cfg.gpt_config(50257).n_layer == 4


# ---------------------------------------------------------------- checkpoints


def small_state(step: int) -> dict:
    return {"format": "forge-pretrain-checkpoint", "step": step, "w": torch.full((64,), step)}


def test_half_written_checkpoints_are_ignored(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(1, small_state(1))
    manager.save(2, small_state(2))
    # a save killed before its rename, and one killed before its sidecar
    dead_writer_temp(tmp_path / "ckpt-000003.pt")
    shutil.copy(tmp_path / "ckpt-000002.pt", tmp_path / "ckpt-000003.pt")
    assert manager.latest() == tmp_path / "ckpt-000002.pt"
    # a newest checkpoint cut short (its sidecar records the full size)
    newest = tmp_path / "ckpt-000002.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    assert manager.latest() == tmp_path / "ckpt-000001.pt"
    assert torch.equal(manager.load()["w"], torch.full((64,), 1))
    # same size, different bytes: caught by the sha256 in the sidecar
    first = tmp_path / "ckpt-000001.pt"
    data = bytearray(first.read_bytes())
    data[-30] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt-000001.pt"):
        manager.load()
    manager.save(4, small_state(4))
    assert not list(tmp_path.glob("*.tmp")) and manager.latest() == tmp_path / "ckpt-000004.pt"


def test_keep_last(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(step * 10, small_state(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000040.json",
        "ckpt-000040.pt",
        "ckpt-000050.json",
        "ckpt-000050.pt",
    ]
    assert [s for s, _ in manager.complete()] == [40, 50]


def test_rng_states_survive_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leave numpy with a cached gaussian
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


# ---------------------------------------------------------------- a short run, in process


@pytest.fixture(scope="module")
def short_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("short")
    cfg = tiny_config(
        dataset, max_steps=12, eval_every=6, checkpoint_every=4, keep_last=2, dropout=0.1
    )
    progress: list[tuple[int, int]] = []
    summary = run_pretrain(cfg, workdir, progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (0, 12) and progress[-1] == (12, 12)
    return workdir, summary


def test_short_run_outputs(short_run: tuple[Path, dict]) -> None:
    workdir, summary = short_run
    out = workdir / "pretrain"
    assert summary["steps"] == 12 and summary["resumed_from"] is None
    assert summary["val_loss"] < math.log(512) - 0.3 > summary["train_loss"]
    assert summary["tokens_per_s"] > 0 and summary["params"] > 0
    assert summary["checkpoint"] == str(out / "checkpoints" / "ckpt-000012.pt")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["val_loss"] == summary["val_loss"]
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 6, 12]
    assert [s for s, _ in CheckpointManager(out / "checkpoints").complete()] == [8, 12]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["lr"] == pytest.approx(3e-3 / 5) and train[-1]["mfu"] is None
    # the learning rate of step s is a function of s alone: the peak times lr_multiplier(s)
    cfg = tiny_config(Path("."), max_steps=12)
    assert [r["lr"] for r in train] == [3e-3 * lr_multiplier(s, cfg, 12) for s in range(12)]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3


def test_checkpoint_loads_weights_only(short_run: tuple[Path, dict]) -> None:
    workdir, _ = short_run
    path = workdir / "pretrain" / "checkpoints" / "ckpt-000012.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {
        "model",
        "optimizer",
        "loader",
        "rng",
        "model_config",
        "dataset_fingerprint",
        "step",
        "train_config",
    } <= set(state)
    assert state["step"] == 12 and state["format"] == "forge-pretrain-checkpoint"
    assert json.loads(path.with_suffix(".json").read_text())["format"] == state["format"]
    assert all(g["initial_lr"] == 3e-3 for g in state["optimizer"]["param_groups"])
    assert state["model_config"]["n_layer"] == 2 and state["model_config"]["vocab_size"] == 512
    assert state["loader"]["position"] == 12 * 2 * 8
    assert set(state["rng"][0]) == {"torch", "numpy", "python"}


def test_finished_run_is_not_redone(short_run: tuple[Path, dict], dataset: Path) -> None:
    workdir, summary = short_run
    cfg = tiny_config(
        dataset, max_steps=12, eval_every=6, checkpoint_every=4, keep_last=2, dropout=0.1
    )
    again = run_pretrain(cfg, workdir)
    assert again["resumed_from"] == 12 and again["checkpoint"] == summary["checkpoint"]
    assert again["train_loss"] == summary["train_loss"]
    assert again["val_loss"] == summary["val_loss"]


def test_checkpoint_of_the_older_format_resumes(
    short_run: tuple[Path, dict], dataset: Path, tmp_path: Path
) -> None:
    """A version 1 checkpoint (a "scheduler" state, no initial_lr in the optimizer's groups)
    resumes exactly as the same checkpoint in today's format."""
    workdir, _ = short_run
    runs = {name: tmp_path / name for name in ("today", "older")}
    for run in runs.values():
        shutil.copytree(workdir / "pretrain", run / "pretrain")
    manager = CheckpointManager(runs["older"] / "pretrain" / "checkpoints")
    state = manager.load()
    for group in state["optimizer"]["param_groups"]:
        del group["initial_lr"]
    manager.save(12, state | {"version": 1, "scheduler": {"step": 12, "lr": 3e-3}})
    cfg = tiny_config(dataset, max_steps=14, eval_every=6, checkpoint_every=4, dropout=0.1)
    summaries = [run_pretrain(cfg, run) for run in runs.values()]
    assert [s["resumed_from"] for s in summaries] == [12, 12]
    today, older = (train_records(run) for run in runs.values())
    assert [today[s]["loss"] for s in (13, 14)] == [older[s]["loss"] for s in (13, 14)]
    assert today[14]["lr"] == older[14]["lr"]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"n_layer": 3}, "n_layer: checkpoint 2, config 3"),
        ({"block_size": 32}, "block_size"),
        ({"recipe": "modern"}, "pretrain.recipe 'gpt2', this config says 'modern'; set "
         "pretrain.recipe: gpt2 to resume it, or start over with --overwrite"),
    ],
)
def test_checkpoint_of_another_model_is_refused(
    short_run: tuple[Path, dict], dataset: Path, change: dict, needle: str
) -> None:
    workdir, _ = short_run
    cfg = tiny_config(dataset, max_steps=12, **change)
    with pytest.raises(CheckpointError, match=needle) as info:
        run_pretrain(cfg, workdir)
    assert "ckpt-000012.pt" in str(info.value)


def test_checkpoint_of_another_dataset_is_refused(
    short_run: tuple[Path, dict], tmp_path: Path
) -> None:
    workdir, _ = short_run
    other = make_dataset(tmp_path, train_sizes=(10_000,), val_size=2_000, seed=9)
    with pytest.raises(CheckpointError, match="ckpt-000012.pt.*dataset") as info:
        run_pretrain(tiny_config(other, max_steps=12), workdir)
    assert "fingerprint" in str(info.value) or "trained on dataset" in str(info.value)


def test_overwrite_starts_over(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, max_steps=3, warmup_steps=1, checkpoint_every=2)
    first = run_pretrain(cfg, tmp_path)
    again = run_pretrain(cfg, tmp_path, overwrite=True)
    assert again["resumed_from"] is None and again["train_loss"] == first["train_loss"]
    records = read_log(tmp_path / "pretrain" / "log.jsonl")
    assert [r["kind"] for r in records].count("start") == 1
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_a_run_starts_by_removing_dead_writers_temporary_files(dataset: Path,
                                                               tmp_path: Path) -> None:
    """A write killed mid-way (here: of the stage's manifest) leaves a temporary file; the
    next run of the stage removes it, and keeps a live writer's."""
    cfg = tiny_config(dataset, max_steps=1, warmup_steps=1)
    (tmp_path / "pretrain").mkdir()
    dead = dead_writer_temp(tmp_path / "pretrain" / "manifest.json")
    live = temp_path_for(tmp_path / "pretrain" / "log.jsonl")  # this process is alive
    run_pretrain(cfg, tmp_path)
    assert not dead.exists() and live.exists()


def test_corrupt_shard_fails_before_training(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "dataset.zarr"
    shutil.copytree(dataset, copy)
    chunk = chunk_file(copy / "train" / "000001")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))  # same size: only the checksum sees it
    with pytest.raises(ShardError, match="train/000001: token checksum mismatch"):
        run_pretrain(tiny_config(copy, max_steps=2, warmup_steps=1), tmp_path / "run")
    chunk.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match=str(chunk)):
        run_pretrain(
            tiny_config(copy, max_steps=2, warmup_steps=1, verify_data=False), tmp_path / "run"
        )
    assert not (tmp_path / "run" / "pretrain" / "log.jsonl").exists()


# ---------------------------------------------------------------- exact resume after SIGKILL


@pytest.mark.parametrize(
    "sig, recipe",
    [(signal.SIGKILL, "gpt2"), (signal.SIGTERM, "gpt2"), (signal.SIGKILL, "modern")],
    ids=["SIGKILL", "SIGTERM", "SIGKILL-modern"],
)
def test_killed_run_resumes_with_identical_losses(
    dataset: Path, tmp_path: Path, sig: signal.Signals, recipe: str
) -> None:
    """A run killed after its first checkpoint, then resumed, logs the same losses bit for bit
    as a run never interrupted (dropout on, so the RNG state must come back too; the modern
    recipe's Muon momentum too).

    SIGKILL loses the steps after the last periodic checkpoint; SIGTERM checkpoints the step
    in flight and exits with 143, so the resume starts right after the last logged step.
    """
    cfg = tiny_config(
        dataset, max_steps=40, eval_every=20, checkpoint_every=10, keep_last=2, dropout=0.1,
        recipe=recipe,
    )
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    cmd = {
        name: [
            sys.executable,
            "-m",
            "cli.main",
            "pretrain",
            "--config",
            str(write_yaml(tmp_path / f"{name}.yaml", workdir, cfg)),
        ]
        for name, workdir in runs.items()
    }
    env = subprocess_env()
    whole = subprocess.Popen(
        cmd["whole"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        cmd["killed"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while last_step(runs["killed"]) < 13:
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        victim.send_signal(sig)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    killed_at = max(train_records(runs["killed"]))
    assert killed_at < 40
    if sig == signal.SIGTERM:
        assert victim.returncode == 143, victim.stderr.read().decode()
        assert not (runs["killed"] / "pretrain" / "manifest.json").exists()
        assert (runs["killed"] / "pretrain" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert victim.returncode == -signal.SIGKILL
    resumed = subprocess.run(cmd["killed"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(timeout=120) == 0, whole.stderr.read().decode()
    summary = json.loads(resumed.stdout)
    if sig == signal.SIGTERM:
        assert summary["resumed_from"] == killed_at
    else:
        assert summary["resumed_from"] in (10, 20, 30) and summary["resumed_from"] <= killed_at

    expected, got = train_records(runs["whole"]), train_records(runs["killed"])
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    for step in expected:
        for key in ("loss", "lr", "grad_norm"):
            assert got[step][key] == expected[step][key], (step, key)
    val = [
        {
            r["step"]: r["val_loss"]
            for r in read_log(w / "pretrain" / "log.jsonl")
            if r["kind"] == "val"
        }
        for w in runs.values()
    ]
    assert val[0] == val[1] and sorted(val[0]) == [0, 20, 40]
    a = load_checkpoint(runs["whole"] / "pretrain/checkpoints/ckpt-000040.pt")
    b = load_checkpoint(runs["killed"] / "pretrain/checkpoints/ckpt-000040.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------- DDP under torchrun

LOADER_SCRIPT = """
import os, sys
import numpy as np
import torch.distributed as dist
from model.data import ShardLoader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = ShardLoader(sys.argv[1], "train", 8, 64, seed=11, rank=rank, world_size=world)
ids = []
for _ in range(int(sys.argv[3])):
    loader.next_batch()
    ids.append(loader.last_indices.copy())
np.save(os.path.join(sys.argv[2], f"rank{rank}.npy"), np.stack(ids))
dist.destroy_process_group()
"""


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]
    result = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_torchrun_ranks_read_disjoint_windows(dataset: Path, tmp_path: Path) -> None:
    script = tmp_path / "windows.py"
    script.write_text(LOADER_SCRIPT)
    torchrun(str(script), str(dataset), str(tmp_path), "20")
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert r0.shape == r1.shape == (20, 8)
    assert not set(r0.ravel()) & set(r1.ravel())
    both = np.concatenate([r0, r1], axis=1).ravel()
    assert len(np.unique(both)) == both.size  # within one epoch: nothing read twice


# Two ranks sum their gradients in another order than one process accumulating twice as many
# micro-batches; float32 rounding differences stay well below this after 16 steps.
DDP_LOSS_TOLERANCE = 1e-4


@pytest.mark.slow
def test_torchrun_matches_one_process(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, max_steps=16, eval_every=8, checkpoint_every=8)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_pretrain(cfg, single)
    result = torchrun(
        "-m", "cli.main", "pretrain", "--config",
        str(write_yaml(tmp_path / "ddp.yaml", ddp, cfg)),
    )
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["world_size"] == 2
    start = next(r for r in read_log(ddp / "pretrain" / "log.jsonl") if r["kind"] == "start")
    assert start["world_size"] == 2 and start["grad_accum"] == 1
    expected, got = train_records(single), train_records(ddp)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    worst = max(abs(got[s]["loss"] - expected[s]["loss"]) for s in expected)
    print(f"largest loss difference, 2 ranks vs 1 process: {worst:.2e}")
    assert worst < DDP_LOSS_TOLERANCE
    assert got[16]["loss"] < got[1]["loss"] - 0.5
    assert CheckpointManager(ddp / "pretrain" / "checkpoints").latest().name == "ckpt-000016.pt"
    state = load_checkpoint(ddp / "pretrain" / "checkpoints" / "ckpt-000016.pt")
    assert len(state["rng"]) == 2  # every rank's RNG state


def test_pretrain_without_a_dataset_says_to_run_forge_prepare(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "pretrain", "--config", "configs/demo.yaml",
         "--workdir", str(work)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"no token dataset at {work / 'tokenize' / 'dataset.zarr'}" in result.stderr
    assert "run `forge prepare --config" in result.stderr
    assert "Traceback" not in result.stderr
