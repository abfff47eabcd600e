"""File helpers every writer uses, and the layout of a work folder: a leaf module.

Atomic writes (a temporary sibling, fsync, rename), checksums and safe names are the same
for a data stage, a checkpoint and an exported model, so they live here once. `WorkFolder`
is the one place that spells where each stage keeps its output. Only the standard library
is imported: `model/` and every pipeline module may depend on this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PRETRAIN, FINETUNE = "pretrain", "finetune"  # the training stages' folders

# ---------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:16] or "host"
# `.<final name>.w<pid>@<host>.<random>.tmp`: who wrote a temporary file, to tell a dead
# writer's leftovers from a live writer's work in progress.
_TEMP_WRITER = re.compile(r"\.w(\d+)@([A-Za-z0-9-]+)\.[^.]+\.tmp$")
STALE_FOREIGN_TEMP_S = 3600  # a writer of another host (or of no name) idle this long is dead


def temp_path_for(final: Path) -> Path:
    """A unique sibling name: concurrent writers (an orphaned worker, a rerun) never collide,
    and the name says which process writes it."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.w{os.getpid()}@{_HOST}.", suffix=".tmp",
                                dir=final.parent)
    os.close(fd)
    return Path(name)


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> int:
    """Delete the temporary files (`*.tmp`) under `folder` whose writer is dead: a process of
    this host that no longer runs, or any other writer idle for an hour. Every stage calls
    this at its start, so killed writes do not pile up. Returns how many were removed."""
    removed = 0
    for path in sorted(Path(folder).rglob("*.tmp")) if Path(folder).is_dir() else []:
        writer = _TEMP_WRITER.search(path.name)
        try:
            if writer and writer[2] == _HOST:
                if _writer_alive(int(writer[1])):
                    continue
            elif time.time() - path.lstat().st_mtime < STALE_FOREIGN_TEMP_S:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # committed or removed meanwhile
            continue
        removed += 1
    return removed


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` (a file, or a folder and everything in it) and rename it over `final`."""
    paths = sorted(tmp.rglob("*"), reverse=True) + [tmp] if tmp.is_dir() else [tmp]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write(final: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` into a temporary sibling of `final`, then commit it: all or nothing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, final)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    atomic_write(final, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(section: Any, *upstream: str) -> str:
    """A stable hash of a config section (a pydantic model) plus upstream fingerprints."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True) + "|".join(upstream)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def safe_name(text: str, limit: int = 120) -> str:
    """A file name that cannot escape its folder: no separators, no leading dots."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "unnamed"
    if len(name) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        name = f"{name[: limit - 13]}-{digest}"
    return name


# ---------------------------------------------------------------- the work folder


class WorkFolder:
    """Where one run keeps everything: `<root>/<stage>/` per stage (data stages, pretrain,
    finetune), each with its `manifest.json` once finished, and Prefect's result cache."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> WorkFolder:
        """The work folder a training checkpoint (`<root>/<stage>/checkpoints/x.pt`) is in."""
        return cls(Path(checkpoint).resolve().parents[2])

    def stage(self, name: str) -> Path:
        return self.root / name

    def manifest(self, name: str) -> Path:
        return self.stage(name) / MANIFEST

    @property
    def dataset(self) -> Path:
        """The token dataset the tokenize stage writes and pretraining reads."""
        return self.stage("tokenize") / "dataset.zarr"

    def checkpoints(self, stage: str) -> Path:
        return self.stage(stage) / "checkpoints"

    def training_log(self, stage: str) -> Path:
        return self.stage(stage) / "log.jsonl"

    def loss_plot(self, stage: str) -> Path:
        return self.stage(stage) / "loss.png"

    def training_outputs(self, stage: str) -> list[Path]:
        """What a training stage writes: removed when it starts over."""
        outputs = [self.checkpoints(stage), self.training_log(stage), self.loss_plot(stage),
                   self.manifest(stage)]
        return outputs + [self.test_responses] if stage == FINETUNE else outputs

    @property
    def test_responses(self) -> Path:
        """The fine-tuned model's answers to the held-out test split."""
        return self.stage(FINETUNE) / "test_responses.json"

    @property
    def prefect_cache(self) -> Path:
        return self.root / ".prefect-cache"
