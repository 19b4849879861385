"""CPU time of a process, for the benchmarks that measure servers by CPU seconds per request."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process `pid` has used so far, from /proc."""
    return _cpu(Path(f"/proc/{pid}/stat"))


def main_thread_cpu(pid: int) -> float:
    """CPU seconds that the main thread of process `pid` (an asyncio server's loop) has used so far."""
    return _cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK
