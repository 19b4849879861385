"""Startup honours --timeout and stop requests (Ctrl-C, `meridian down`) without a real stack."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import cli, launcher
from deploy.settings import DEFAULT_TOPOLOGY, Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(topology=DEFAULT_TOPOLOGY, var_dir=tmp_path / "var", cache_dir=tmp_path / "cache",
                    api_key="mk-test")


@pytest.fixture
def stack(settings: Settings, monkeypatch) -> launcher.LocalStack:
    """A stack with no processes whose gateway answers 503 for 3 s, then 200.

    http_get is replaced, so nothing on the network (the topology's default ports) is touched;
    the late 200 bounds how long old, stop-ignoring code can hang a test.
    """
    ready_at = time.monotonic() + 3.0
    monkeypatch.setattr(launcher, "http_get", lambda url, timeout=2.0: (
        (200, "ok") if time.monotonic() >= ready_at else (503, "zone-a not ready")))
    s = launcher.LocalStack(settings, launcher.resolve_topology(settings))
    monkeypatch.setattr(s, "plan", lambda: [])
    return s


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_wait_ready_stops_when_asked(stack):
    asked_at = time.monotonic() + 0.2
    t0 = time.monotonic()
    with pytest.raises(launcher.StartupAborted):
        stack._wait_ready(30.0, lambda m: None, lambda: time.monotonic() >= asked_at)
    assert time.monotonic() - t0 < 1.0


def test_supervise_gives_up_at_the_given_timeout(settings, stack, restore_signals):
    out: list[str] = []
    t0 = time.monotonic()
    rc = launcher.supervise(settings, stack, progress=out.append, timeout=0.5)
    elapsed = time.monotonic() - t0

    assert rc == 1
    assert 0.5 <= elapsed < 1.5
    state = launcher.read_state(settings)
    assert state["status"] == "failed"
    assert "not ready after 0.5s" in state["error"]


def test_sigterm_during_startup_stops_without_reporting_ready(settings, stack, restore_signals):
    out: list[str] = []
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    try:
        rc = launcher.supervise(settings, stack, progress=out.append, timeout=30.0)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - t0

    assert rc == 1
    assert elapsed < 1.5
    assert not any("Meridian is up" in m for m in out)
    assert any("stopped during startup" in m for m in out)
    assert launcher.read_state(settings)["status"] == "stopped"
    assert launcher.running_supervisor(settings) is None


def test_up_passes_its_timeout_to_the_supervisor(tmp_path, monkeypatch):
    seen: dict = {}

    def fake_supervise(settings, stack, progress=print, timeout=None):
        seen["timeout"] = timeout
        return 0

    # No port probes or artefact checks: only the hand-over of --timeout is under test.
    monkeypatch.setattr(launcher, "check_ports", lambda topology: None)
    monkeypatch.setattr(launcher.LocalStack, "_check_artefacts", lambda self: None)
    monkeypatch.setattr(launcher, "supervise", fake_supervise)
    monkeypatch.setenv("MERIDIAN_API_KEY", "mk-test")

    assert cli.main(["up", "--var-dir", str(tmp_path / "var"), "--timeout", "5"]) == 0
    assert seen["timeout"] == 5.0


class _SupervisorStoppedDuringStartup:
    """Stands in for the detached `up`: it records that it was stopped before ready, and lingers."""

    settings: Settings
    signalled: list[int] = []

    def __init__(self, argv, **kwargs):
        self.pid = os.getpid()
        launcher.write_state(self.settings, status="stopped", error="stopped during startup")

    def poll(self):
        return None

    def send_signal(self, sig):
        self.signalled.append(sig)


def test_detached_up_reports_a_stop_during_startup(settings, monkeypatch, capsys):
    _SupervisorStoppedDuringStartup.settings = settings
    monkeypatch.setattr(subprocess, "Popen", _SupervisorStoppedDuringStartup)
    args = cli._parser().parse_args(["up", "--detach", "--var-dir", str(settings.var_dir), "--timeout", "0.5"])

    t0 = time.monotonic()
    rc = cli._detach(args, settings)

    assert rc == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stopped during startup") and "\n" not in err
