"""Where the config tree lives: inside the package when installed from a wheel, else the repository's configs/;
and the model shapes it names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.llama import ModelArgs

_HERE = Path(__file__).resolve().parent


def config_dir() -> Path:
    for candidate in (_HERE / "configs", _HERE.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"harness configs not found next to {_HERE} (broken installation?)")


def model_shape(name: str) -> ModelArgs:
    """The shape of a named model config (configs/model/<name>.yaml), for scripts that build it without Hydra."""
    import yaml

    from engines.llama import ModelArgs

    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"model: {name!r} is not a named shape; allowed: {', '.join(names)}")
    return ModelArgs.from_dict(yaml.safe_load(path.read_text()))
