"""Atomic training checkpoints: the newest K, each complete or ignored.

    checkpoints/
      ckpt-000100.pt      torch.save of the state (written as
                          .ckpt-000100.pt.w<pid>@<host>.<random>.tmp, fsynced, renamed)
      ckpt-000100.json    sidecar: step, size and sha256 of the .pt; written last, atomically

A checkpoint counts only once its sidecar exists and the .pt has the size the sidecar records,
so a run killed at any instant leaves either a complete checkpoint or one that latest() skips.
Everything saved loads with torch.load(weights_only=True): tensors, and plain dicts, lists,
strings and numbers (RNG states as tensors and lists, configs as dicts). The state's "format"
says which stage wrote it (pretraining, which `forge import-gpt2` also writes, or fine-tuning),
and the sidecar repeats it. load_checkpoint() is the one reader.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write, atomic_write_json, remove_stale_temps, sha256_file

log = logging.getLogger(__name__)

PRETRAIN_FORMAT = "forge-pretrain-checkpoint"
FINETUNE_FORMAT = "forge-finetune-checkpoint"
FORMATS = (PRETRAIN_FORMAT, FINETUNE_FORMAT)
# 2: the learning rate is a function of the step, so no "scheduler" state (version 1 had one,
# which is ignored), and "rng" is a list of every rank's states in both stages
FORMAT_VERSION = 2
_NAME = re.compile(r"^ckpt-(\d{6,})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run in `folder`, keeping the last K."""

    def __init__(self, folder: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"ckpt-{step:06d}.pt"

    @staticmethod
    def sidecar_for(path: Path) -> Path:
        return path.with_suffix(".json")

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of `step` atomically, then its sidecar, then prune old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)  # left by a killed save
        final = self.path_for(step)
        t0 = time.perf_counter()
        atomic_write(final, lambda tmp: torch.save(state, tmp))
        sidecar = {
            "format": state.get("format"),
            "step": step,
            "file": final.name,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            "time": time.time(),
        }
        atomic_write_json(self.sidecar_for(final), sidecar)
        log.info(
            "checkpoint %s (%.1f MB, %.1fs)",
            final,
            sidecar["bytes"] / 1e6,
            time.perf_counter() - t0,
        )
        self.prune()
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        found = []
        if not self.folder.is_dir():
            return found
        for side in self.folder.iterdir():
            match = _NAME.match(side.name)
            if not match:
                continue
            try:
                meta = json.loads(side.read_text())
                path = self.folder / meta["file"]
                if path.stat().st_size == int(meta["bytes"]):
                    found.append((int(meta["step"]), path))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a sidecar or checkpoint that is not all there
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint; half-written or truncated ones are skipped."""
        done = self.complete()
        return done[-1][1] if done else None

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; remove older ones and orphans."""
        done = self.complete()
        keep = {path for _, path in done[-self.keep_last :]}
        newest = done[-1][0] if done else -1
        for step, path in done[: -self.keep_last]:
            self.sidecar_for(path).unlink(missing_ok=True)  # sidecar first: never a dangling one
            path.unlink(missing_ok=True)
            log.debug("removed checkpoint %s (step %d)", path, step)
        # .pt files without a sidecar older than the newest complete one: killed mid-save
        for path in self.folder.glob("ckpt-*.pt"):
            match = re.match(r"^ckpt-(\d+)\.pt$", path.name)
            if match and path not in keep and int(match.group(1)) < newest:
                self.sidecar_for(path).unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    def load(
        self, path: str | Path | None = None, map_location: str | torch.device = "cpu"
    ) -> dict:
        """The state saved in `path` (default: latest()), checked against its sidecar's sha256."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"no complete checkpoint in {self.folder}")
        return load_checkpoint(path, map_location)


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
    expect_sha256: str | None = None,
) -> dict:
    """torch.load(weights_only=True) of a forge checkpoint (of format `kind`, when given),
    checked against its sidecar's sha256 and against expect_sha256 when the caller knows which
    bytes it wants."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = CheckpointManager.sidecar_for(path)
    wanted = [expect_sha256] if expect_sha256 else []
    if side.is_file():
        try:
            wanted.append(json.loads(side.read_text())["sha256"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"sidecar {side} is unreadable; delete it and {path}") from None
    if wanted and any(sha != sha256_file(path) for sha in wanted):
        raise CheckpointError(
            f"checkpoint {path} does not have the expected sha256: it is corrupt or was "
            "replaced; delete it to resume from an older one"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from e
    found = state.get("format") if isinstance(state, dict) else None
    if found not in FORMATS or (kind is not None and found != kind):
        what = {PRETRAIN_FORMAT: "pretraining", FINETUNE_FORMAT: "fine-tuning"}.get(kind, "forge")
        raise CheckpointError(f"{path} is not a {what} checkpoint")
    if int(state.get("version", 1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state['version']}, newer than this forge "
            f"reads ({FORMAT_VERSION}); update forge"
        )
    return state


def check_compatible(state: dict, path: str | Path, model_config: dict, fingerprint: str) -> None:
    """Refuse a checkpoint made for another model shape or another dataset."""
    saved = state.get("model_config", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {v!r}"
        for k, v in model_config.items()
        if k != "dropout" and saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made for another model ({'; '.join(diffs)}); use the "
            "config it was trained with, or start over with --overwrite"
        )
    if state.get("dataset_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained on dataset {state.get('dataset_fingerprint')!r}, "
            f"not on this one ({fingerprint!r}); point pretrain.dataset at the original data, "
            "or start over with --overwrite"
        )


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states in weights_only-loadable form (tensors, lists, numbers)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), [int(x) for x in internal], gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
