"""Child processes of the launcher: a child started again leaves nothing of its last run behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from deploy.processes import Child, pid_alive


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        try:  # reap it if it is ours to reap; a zombie still counts as alive
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return not pid_alive(pid)


def test_a_child_started_again_kills_what_its_crashed_run_left(tmp_path: Path):
    # As a crashed Triton leaves its python stub: a process of the child's group that ignores
    # SIGTERM and outlives its parent.
    pidfile = tmp_path / "grandchild.pid"
    script = f"(trap '' TERM; exec sleep 300) & echo $! > {pidfile}; wait"
    child = Child("server", ["sh", "-c", script], tmp_path / "server.log")
    child.start()
    try:
        deadline = time.monotonic() + 5
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        grandchild = int(pidfile.read_text())
        os.kill(child.pid, signal.SIGKILL)  # the server alone crashes
        child.proc.wait(5)
        assert pid_alive(grandchild)
        child.start()
        assert _gone(grandchild), "the last run's leftover still runs"
        assert child.alive()
        with pytest.raises(RuntimeError, match="still running"):
            child.start()
    finally:
        child.stop(timeout=2)


def test_a_child_s_cleanup_runs_once_it_is_gone_and_before_each_start(tmp_path: Path):
    # As a Triton's shared-memory regions: left behind by a kill, removed before it starts again.
    calls = []
    child = Child("server", ["sleep", "300"], tmp_path / "server.log", cleanup=lambda: calls.append(child.alive()))
    child.start()
    assert calls == [False]
    child.kill()
    assert calls == [False, False]
    child.start()
    child.stop(timeout=5)
    assert calls == [False, False, False, False]  # every call found no process of it running


def test_the_log_tail_is_the_current_run_s_only(tmp_path: Path):
    log = tmp_path / "child.log"
    log.write_text("an earlier run's last words\n")
    child = Child("echo", [sys.executable, "-c", "print('this run')"], log)
    child.start(die_with_parent=False)
    child.proc.wait(10)
    assert child.log_tail() == "this run"
    assert log.read_text().startswith("an earlier run's")  # still appended, not truncated
