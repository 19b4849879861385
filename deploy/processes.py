"""Child processes the launcher owns: started with their own log file, stopped in order.

Each child asks the kernel to SIGTERM it when the launcher dies (PR_SET_PDEATHSIG), so a killed
launcher never leaves a stack running behind it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    # Run whenever the process and its group are gone (after a kill or stop, before a start): removes
    # what a killed run leaves behind.
    cleanup: Callable[[], object] | None = field(default=None, repr=False)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)  # where this run's output begins in the log

    def start(self, *, die_with_parent: bool = True) -> None:
        """Start the process, its output appended to its log file. Started again, it first kills
        what is left of the last run's group: a Triton that crashed leaves its python stubs running
        (they ignore SIGTERM, and their parent's death reaches them as nothing)."""
        if self.proc is not None:
            if self.alive():
                raise RuntimeError(f"{self.name} is still running (pid {self.proc.pid})")
            self.signal_group(signal.SIGKILL)
        if self.cleanup is not None:
            self.cleanup()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Own session: Ctrl-C reaches the launcher only, which stops children in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        """Signal the child's whole process group: its own children (Triton's python stubs) too."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crashed machine would go."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        if self.cleanup is not None:
            self.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; leftovers of its group are killed too."""
        if self.proc is None:
            return
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_tail(self, lines: int = 25) -> str:
        """The last lines the child's current run wrote to its log, for error reports (the log is
        appended to across runs: an earlier run's lines would read as this one's)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                text = log.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    """Stop children in the given order, signalling all first so they drain in parallel."""
    for child in children:
        if child.alive():
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        child.kill()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    A pid plus its start time names one process for good: a reused pid gets a later start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces or parentheses: count fields after its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (state), so field 22 is fields[19]
    except (IndexError, ValueError):
        return None
