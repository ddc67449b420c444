"""A history measured for real, shared by the history, dashboard and browser tests: N_COMMITS sweeps of the
random-weight `tiny`, one per commit of a scratch git repository, each run with that checkout as the working
directory (so each record carries that commit's SHA, as `harness env` reads it).

The code at each commit sets the `slowed-test` engine's ``engine.slowdown`` (real extra work in every forward,
tests/conftest.py): zero up to commit FIRST_SLOW - 1 and SLOWDOWN from commit FIRST_SLOW on. The slowdown is
read from the checkout, not given as a config override, because a commit changes the code and not the point:
an override would make a new variant (a new point key), hence a new series instead of a step in one.

The history is built once per test session (the first test that needs it) under the session's temporary
directory, in one to two minutes (the tests that use it are marked slow): the objects the test session
already holds are frozen out of the garbage collector meanwhile (``gc.freeze``), so that the collections each
point runs around its timed window stay short. ``synthetic_history`` is the fast stand-in of the UI tests.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import NoParams, SlowedEngine, SlowParams, _run_in_process

from engines.base import Engine, register
from harness import reference

N_COMMITS = 30
FIRST_SLOW = 18  # 0-based: commits 0..17 are fast, 18..29 slow
SLOWDOWN = 2.0  # the forward's own time twice over in extra work: 3x as slow
SLOWDOWN_FILE = "SLOWDOWN"
BATCHES = (1, 2)
SWEEP = [
    "engine.name=checkout-test", "model=tiny", "model.weights=random", "quality.enabled=false",
    f"workload.batch_size={','.join(map(str, BATCHES))}", "workload.prompt_len=16", "workload.gen_len=8",
    "measure=quick", "measure.min_reps=10", "measure.max_reps=10", "measure.max_time_s=10",
    "measure.target_ci=1e-9",
]  # fmt: skip
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}  # fmt: skip


@register
class CheckoutEngine(Engine):
    """The measured code at the checked-out commit: `slowed-test` with the ``engine.slowdown`` that the
    checkout's SLOWDOWN file (in the working directory) sets."""

    name = "checkout-test"
    Params = NoParams

    def prepare(self, model, ctx):
        slowdown = float((Path.cwd() / SLOWDOWN_FILE).read_text())
        return SlowedEngine(SlowParams(slowdown=slowdown)).prepare(model, ctx)


@dataclass
class RealHistory:
    root: Path
    db: Path
    sweeps: list[Path]
    shas: list[str]  # commit of each sweep, in order
    first_slow: int = FIRST_SLOW


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _sweep(repo: Path, out: Path) -> None:
    reference.release()  # each commit's code is prepared afresh, as in a new process
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(repo)
        mp.setenv("HYDRA_FULL_ERROR", "1")
        code = _run_in_process("run", "-m", *SWEEP, f"hydra.sweep.dir={out}")
    assert code == 0, f"sweep failed: {out}"


def _commit_and_measure(repo: Path, root: Path, i: int, sweeps: list[Path], shas: list[str]) -> None:
    """Commit ``i`` (its SLOWDOWN) and measure a sweep of it."""
    (repo / SLOWDOWN_FILE).write_text(str(SLOWDOWN if i >= FIRST_SLOW else 0.0))
    (repo / "commit.txt").write_text(f"commit {i}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"commit {i}")
    out = root / "sweeps" / f"{i:02d}"
    _sweep(repo, out)
    sweeps.append(out)
    shas.append(_git(repo, "rev-parse", "HEAD"))


def build(root: Path) -> RealHistory:
    """Measure the history under ``root`` (or return the one measured there already)."""
    done = root / "history.json"
    if done.exists():
        meta = json.loads(done.read_text())
        return RealHistory(root, root / "history.sqlite", [Path(p) for p in meta["sweeps"]], meta["shas"])
    repo = root / "repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "commit.gpgsign", "false")
    sweeps, shas = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: less exposed to whatever else runs on the machine
    gc.collect()
    gc.freeze()
    try:
        for i in range(N_COMMITS):
            _commit_and_measure(repo, root, i, sweeps, shas)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    db = root / "history.sqlite"
    with contextlib.redirect_stdout(io.StringIO()):
        assert _run_in_process("history", "add", *map(str, sweeps), "--db", str(db)) == 0
    done.write_text(json.dumps({"sweeps": list(map(str, sweeps)), "shas": shas}))
    return RealHistory(root, db, sweeps, shas)


@pytest.fixture(scope="session")
def real_history(tmp_path_factory) -> RealHistory:
    """The measured history (built once per session, whichever test module asks first)."""
    return build(tmp_path_factory.getbasetemp() / "real-history")


SYNTHETIC_SWEEPS, SYNTHETIC_STEP = 32, 20


def synthetic_history(root: Path, synthetic_point, db: Path) -> list[str]:
    """A fast stand-in for the UI tests: SYNTHETIC_SWEEPS sweeps of two points (batch 1 and 2) written as the
    record schema says, 2% log-normal noise from sweep to sweep, TPOT and TTFT 30% slower from sweep
    SYNTHETIC_STEP on, one commit and start time per sweep, a report.html in each; added to ``db``. Returns
    the commits in order."""
    import numpy as np

    rng = np.random.default_rng(7)
    shas = []
    for i in range(SYNTHETIC_SWEEPS):
        sha = f"{i:02d}" + "c0ffee" * 6 + "ab"
        d = root / f"sweep-{i:02d}"
        for b in BATCHES:
            level = (1.3 if i >= SYNTHETIC_STEP else 1.0) * float(np.exp(rng.normal(0, 0.02))) * b
            synthetic_point(d / str(b), ttft=list(5 * level * np.exp(rng.normal(0, 0.02, 10))),
                            tpot=list(level * np.exp(rng.normal(0, 0.02, 10))), batch_size=b)  # fmt: skip
            path = d / str(b) / "record.json"
            rec = json.loads(path.read_text())
            rec["env"]["git"]["sha"] = sha
            rec["started_at"] = f"2026-10-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00"
            path.write_text(json.dumps(rec))
        (d / "report.html").write_text(f"<!DOCTYPE html><title>report of sweep {i}</title>")
        shas.append(sha)
    with contextlib.redirect_stdout(io.StringIO()):
        assert _run_in_process("history", "add", *sorted(map(str, root.glob("sweep-*"))), "--db", str(db)) == 0
    return shas
