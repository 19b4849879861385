"""How much memory a piece of work needs at its peak, measured in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

# The child's peak is read from /proc after resetting it: ru_maxrss would carry over the peak of the
# process that started it (a test session holding models).
_MEASURE = """
import re, sys
from pathlib import Path
{setup}
kib = lambda key: int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
{work}
print(kib("VmHWM") - before)
"""


def peak_growth_mib(setup: str, work: str, *args: str) -> float:
    """MiB by which a new Python process's resident memory peaks above where it stood after `setup`
    (imports), while it runs `work` (with `args` as sys.argv[1:])."""
    script = _MEASURE.format(setup=setup, work=work)
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout) / 1024
