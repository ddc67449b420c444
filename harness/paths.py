"""Where the config tree lives: inside the package when installed from a wheel, else the repository's configs/."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def config_dir() -> Path:
    for candidate in (_HERE / "configs", _HERE.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"harness configs not found next to {_HERE} (broken installation?)")
