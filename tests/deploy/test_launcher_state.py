"""The supervisor state file: `down` and `up` must only trust a pid that is still our supervisor."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import cli, launcher, processes
from deploy.processes import pid_alive
from deploy.settings import DEFAULT_TOPOLOGY, Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(topology=DEFAULT_TOPOLOGY, var_dir=tmp_path / "var", cache_dir=tmp_path / "cache",
                    api_key="mk-test")


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen]:
    """An unrelated live process whose pid the state file will name."""
    proc = subprocess.Popen(["sleep", "60"])
    # Reap it the moment it dies, so a wrongly signalled sleep is seen as gone (not a zombie).
    reaper = threading.Thread(target=proc.wait, daemon=True)
    reaper.start()
    yield proc
    proc.kill()
    reaper.join(5)


def _write(settings: Settings, **state) -> None:
    launcher.state_path(settings).parent.mkdir(parents=True, exist_ok=True)
    launcher.state_path(settings).write_text(json.dumps(state))


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, read here independently of the code under test."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _same_process(pid: int, started: int) -> bool:
    try:
        return pid_alive(pid) and _start_time(pid) == started
    except OSError:
        return False


def _states(pid: int) -> list[dict]:
    started = _start_time(pid)
    return [
        {"pid": pid, "start_time": started, "status": "stopped"},
        {"pid": pid, "start_time": started, "status": "failed", "error": "boom"},
        {"pid": pid, "start_time": started + 1, "status": "ready"},  # the pid was reused since
        {"pid": pid, "status": "ready"},  # no start time recorded: nothing proves it is ours
    ]


@pytest.mark.parametrize("case", range(4), ids=["stopped", "failed", "start-time-mismatch", "no-start-time"])
def test_down_leaves_an_unrelated_process_alone(settings, bystander, capsys, case):
    started = _start_time(bystander.pid)
    _write(settings, **_states(bystander.pid)[case])

    rc = cli.main(["down", "--var-dir", str(settings.var_dir)])

    assert rc == 0
    assert capsys.readouterr().out.strip() == "no stack is running"
    assert _same_process(bystander.pid, started)
    assert launcher.running_supervisor(settings) is None  # so `up` does not refuse either


def test_a_live_supervisor_is_still_found(settings):
    for status in ("starting", "ready"):
        launcher.write_state(settings, status=status)
        assert launcher.running_supervisor(settings) == os.getpid()
    launcher.write_state(settings, status="stopped")
    assert launcher.running_supervisor(settings) is None


def test_process_start_time_survives_odd_command_names(tmp_path):
    # comm may hold spaces and parentheses; the fields after it must still be counted right.
    exe = tmp_path / "a b) (c"
    exe.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(exe), "30"])
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        assert ") (c)" in stat
        assert processes.process_start_time(proc.pid) == _start_time(proc.pid)
        assert processes.process_start_time(os.getpid()) == _start_time(os.getpid())
        assert processes.process_start_time(2**22 + 7) is None  # above pid_max: no such process
    finally:
        proc.kill()
        proc.wait()
