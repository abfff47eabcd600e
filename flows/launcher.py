"""Run a command (the trainer, under torchrun or not) as a child of a flow run.

Its output is streamed line by line into a logger (the Prefect run logger: the lines land in
the run's logs). When the flow run stops early (cancelled from the UI, whose runner sends the
flow process SIGTERM; Ctrl-C; an error in the flow), the child gets SIGTERM, then SIGKILL
after a grace period: a trainer checkpoints the step in flight on SIGTERM (model/stopping.py)
and the next run resumes from it. A nonzero exit fails the run with the last lines of output
in the message.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

# Exec shim: ask the kernel to SIGTERM the child when its parent dies (even by SIGKILL), so a
# killed flow process never leaves a trainer running; the flag survives the exec.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0); "
    "os.getppid() != int(sys.argv[1]) and sys.exit(143); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class CommandError(RuntimeError):
    """The child exited with a nonzero code."""


def run_command(
    command: Sequence[str],
    logger: logging.Logger | logging.LoggerAdapter,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stop_grace_s: float = 25.0,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 30,
) -> None:
    """Run `command` to completion, logging each line of its stdout and stderr.

    `stop_grace_s` is how long the child may take to exit after SIGTERM; keep it under the
    Prefect runner's own grace (30 s) so that the child, not the runner, decides the end.
    `on_line` sees every line too (progress from the output).
    """
    argv = list(command)
    if sys.platform == "linux":
        argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    logger.info("running: %s", " ".join(command))
    # own session: a terminal's Ctrl-C reaches the flow, which stops the child once, cleanly
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", bufsize=1, env=child_env, cwd=cwd,
                               start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info("%s", line)
            if on_line:
                on_line(line)
        code = process.wait()
    except BaseException:
        _stop(process, logger, stop_grace_s)
        raise
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last = "\n".join(tail)
        raise CommandError(f"{' '.join(command[:4])} ... {how}; its last lines:\n{last}")


def _stop(process: subprocess.Popen, logger: logging.Logger | logging.LoggerAdapter,
          grace_s: float) -> None:
    """SIGTERM the child's process group, log what it still says, SIGKILL it after `grace_s`."""
    if process.poll() is not None:
        return
    logger.warning("stopping %d with SIGTERM (SIGKILL in %.0f s)", process.pid, grace_s)
    _signal_group(process, signal.SIGTERM)
    try:
        rest, _ = process.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        logger.warning("%d did not exit within %.0f s; sending SIGKILL", process.pid, grace_s)
        _signal_group(process, signal.SIGKILL)
        rest, _ = process.communicate()
    for line in (rest or "").splitlines():
        logger.info("%s", line)
    logger.warning("the child exited with code %s", process.returncode)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, sig)
