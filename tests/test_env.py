"""The environment a point runs in: huge pages for weights (measured, not assumed), the thread count, and the git
state of the measured checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import harness.env
from harness.env import fingerprint, fingerprint_id, git_state, huge_pages
from harness.point import DEFAULT_THREADS, apply_threads

PROBE = "from harness.env import huge_pages; import json; print(json.dumps(huge_pages()))"


def _probe(env: dict[str, str]) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_huge_pages_are_probed_in_a_fresh_process(subprocess_env):
    """With THP_MEM_ALLOC_ENABLE=1 and a kernel that allows it, a large tensor lands on huge pages; with 0 it does
    not (unless the kernel gives them to every allocation: THP `always`)."""
    on = _probe({**subprocess_env, "THP_MEM_ALLOC_ENABLE": "1"})
    off = _probe({**subprocess_env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert on["torch_alloc"] == "1" and off["torch_alloc"] == "0"
    if on["system"] in ("madvise", "always"):
        assert on["in_use"] is True
    if on["system"] in ("madvise", "never"):
        assert off["in_use"] is False


def test_the_cli_turns_huge_pages_on_unless_the_user_chose(subprocess_env):
    code = "import os; from harness.cli import main; main(['--help']); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in subprocess_env.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    chosen = subprocess.run(
        [sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, capture_output=True, text=True
    )
    assert default.stdout.strip().splitlines()[-1] == "1"
    assert chosen.stdout.strip().splitlines()[-1] == "0"


def test_fingerprint_records_huge_pages_and_keeps_older_ids():
    fp = fingerprint(torch.device("cpu"))
    assert fp["huge_pages"] == huge_pages()
    without = {**fp, "huge_pages": {**fp["huge_pages"], "in_use": False}}
    older = {k: v for k, v in fp.items() if k != "huge_pages"}  # a record from before the field existed
    assert fingerprint_id(without) == fingerprint_id(older)
    assert fingerprint_id({**fp, "huge_pages": {"in_use": True}}) != fingerprint_id(older)


def test_apply_threads_sets_and_restores(compose_cfg):
    from harness.config import validate

    try:
        apply_threads(validate(compose_cfg("threads=1")))
        assert torch.get_num_threads() == 1
        assert fingerprint(torch.device("cpu"))["torch_threads"] == 1
        apply_threads(validate(compose_cfg()))
        assert torch.get_num_threads() == DEFAULT_THREADS
    finally:
        torch.set_num_threads(DEFAULT_THREADS)


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    ident = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    out = subprocess.run(["git", *ident, *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_git_state_is_the_measured_checkouts_and_falls_back_to_the_harness_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    harness_dir = Path(harness.env.__file__).resolve().parent
    harness_head = subprocess.run(
        ["git", "rev-parse", "HEAD", "--show-toplevel"], cwd=harness_dir, capture_output=True, text=True
    )

    monkeypatch.chdir(repo)  # a point measured from inside the project: its commit, clean
    state = git_state()
    assert state == {"sha": head, "dirty": False, "repo": str(repo.resolve())}
    assert fingerprint(torch.device("cpu"))["git"] == state  # and the record carries it
    assert git_state(repo)["sha"] == head  # an explicit path wins over the cwd
    (repo / "model.py").write_text("x = 2\n")  # a tracked file edited: dirty; untracked files do not count
    (repo / "notes.txt").write_text("scratch\n")
    assert git_state() == {**state, "dirty": True}

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above tmp_path
    monkeypatch.chdir(outside)
    fallback = git_state()
    if harness_head.returncode == 0:  # outside any repo: the checkout the harness runs from
        sha, top = harness_head.stdout.split()
        assert fallback["sha"] == sha != head and fallback["repo"] == top
    else:
        assert fallback == {"sha": None, "dirty": None, "repo": None}
    # and where neither the cwd nor the harness is a checkout, every field is None (no crash, no guess)
    monkeypatch.setattr(harness.env, "__file__", str(outside / "env.py"))
    assert git_state() == {"sha": None, "dirty": None, "repo": None}
