"""Everything the launcher takes from the environment and the command line, resolved once."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOPOLOGY = Path(__file__).with_name("local.yaml")


def default_cache_dir() -> Path:
    """$MERIDIAN_CACHE, else ~/.cache/meridian: heavy artefacts kept outside git."""
    return Path(os.environ.get("MERIDIAN_CACHE") or Path.home() / ".cache" / "meridian").resolve()


@dataclass(frozen=True)
class Settings:
    topology: Path
    var_dir: Path
    cache_dir: Path
    api_key: str
    core_model: Path | None = None

    @classmethod
    def resolve(
        cls, *, topology: str | None = None, var_dir: str | None = None, core_model: str | None = None
    ) -> Settings:
        """Settings from flags, then the environment, then defaults."""
        var = Path(var_dir or "var").resolve()
        return cls(
            topology=Path(topology).resolve() if topology else DEFAULT_TOPOLOGY,
            var_dir=var,
            cache_dir=default_cache_dir(),
            api_key=os.environ.get("MERIDIAN_API_KEY") or _local_key(var / "api-key"),
            core_model=Path(core_model).resolve() if core_model else None,
        )

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "logs"


def _local_key(path: Path) -> str:
    """A key made on first run and kept, so scripts can read it back."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "mk-local-" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key
