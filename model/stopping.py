"""A graceful stop for the training loops: SIGTERM or Ctrl-C ends the run at a checkpoint.

A cancelled flow run, a preempted cluster job and `kill PID` all send SIGTERM; the loop
finishes the step in flight, checkpoints it and returns, so nothing trained is lost and the
next run resumes from exactly that step. A second signal is not caught: it does what it would
have done without us (SIGTERM ends the process, Ctrl-C raises KeyboardInterrupt).

Handlers can only be installed from the main thread; elsewhere (a library caller's worker
thread) the loop runs as before and only its periodic checkpoints protect it.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """A context manager that turns the first SIGTERM/SIGINT into a flag the loop polls."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, the way the signal normally does
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then checkpointing and exiting "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def requested(self, group_size: int = 1, device: torch.device | None = None) -> bool:
        """Whether to stop after this step; under DDP, whether any rank was signalled.

        Every rank must stop at the same step (a checkpoint is a collective), so with a
        process group this is an all-reduce each rank calls once per step.
        """
        if group_size <= 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag) > 0:
            self.signum = int(flag)
        return self.signum is not None


def stop_exit_code(summary: dict) -> int:
    """A command's exit code: 0 when the run finished, else the shell's code for the signal
    that stopped it (143 for SIGTERM, 130 for Ctrl-C), so a caller never takes it for done."""
    name = summary.get("stopped_by")
    return 128 + signal.Signals[name] if name else 0
