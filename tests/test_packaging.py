"""The wheel carries the config tree, and the installed package finds it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _source_copy(dest: Path) -> Path:
    """The project's files as a commit would hold them (tracked and not ignored, as `git ls-files` lists them),
    copied into ``dest``: the build writes its build/ and egg-info there, not into the tree being edited, and a
    stale build/lib cannot ship a module that was deleted from the source."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, timeout=60)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout, cannot list the project's files: {proc.stderr.decode()[-300:]}")
    for rel in filter(None, proc.stdout.decode().split("\0")):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the work tree is not in the next commit
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"wheel build failed: {proc.stderr[-2000:]}")
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_contains_packages_configs_and_entry_point(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    for rel in configs:
        assert f"harness/configs/{rel}" in names, rel
    assert "engines/llama.py" in names and "harness/cli.py" in names
    assert "harness/report/__init__.py" in names and "harness/report/figures.py" in names
    assert "hydra_plugins/harness_launcher/interleaved_launcher.py" in names  # the `interleaved` launcher
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "harness = harness.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "results/")) for n in names)


def test_installed_wheel_finds_its_configs(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import harness.paths as p, hydra, sys; d = p.config_dir(); "
        f"assert str(d).startswith({str(tmp_path)!r}), d; "
        "from hydra import compose, initialize_config_dir; "
        "initialize_config_dir(config_dir=str(d), version_base='1.3'); "
        "cfg = compose(config_name='config', overrides=['model=medium', '+sweep=demo']); "
        "print(cfg.model.name, cfg.engine.name)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["medium", "eager"]
