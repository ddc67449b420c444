"""A point's deadline (measure.timeout_s) never leaves a module half-imported for the points after it."""

from __future__ import annotations

import json
import sys
import time

import pytest

from harness.isolation import PointTimeout, deadline


def test_a_deadline_inside_an_import_waits_for_the_import_then_fires(tmp_path, monkeypatch):
    pkg = tmp_path / "slowpkg_deadline"
    pkg.mkdir()
    (pkg / "done.py").write_text("VALUE = 1\n")
    (pkg / "__init__.py").write_text("import time\nfrom . import done\ntime.sleep(0.4)\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(PointTimeout, match="measure.timeout_s=0.1"):
        with deadline(0.1):
            import slowpkg_deadline  # noqa: F401
            time.sleep(5.0)  # the deadline still ends the point, right after the import
    assert time.monotonic() - t0 < 2.0
    module = sys.modules["slowpkg_deadline"]
    assert module.COMPLETE is True and module.done.VALUE == 1  # whole, with its submodule bound
    for name in ("slowpkg_deadline", "slowpkg_deadline.done"):
        sys.modules.pop(name, None)


def test_a_paused_deadline_does_not_count_the_pause_and_still_fires_after_it():
    from harness.isolation import deadline_paused, paused_s

    before = paused_s()
    t0 = time.monotonic()
    with pytest.raises(PointTimeout, match="measure.timeout_s=0.3"):
        with deadline(0.3):
            with deadline_paused():  # a cache entry built: 0.5 s, longer than the whole deadline
                time.sleep(0.5)
                with deadline_paused():  # nested: counted once
                    time.sleep(0.05)
            time.sleep(0.15)  # 0.15 s of the point's own 0.3 s
            assert time.monotonic() - t0 > 0.65
            time.sleep(5.0)  # ... and the rest still ends it
    assert 0.55 <= paused_s() - before < 1.0
    assert time.monotonic() - t0 < 2.0


def test_a_sweep_with_a_short_timeout_trains_once_then_times_its_points(run_harness, tmp_path, monkeypatch):
    """Reference training is built once for every point that needs it: measure.timeout_s does not cut it (cut, it
    never got cached and every point trained again until its own timeout), the records carry the build time,
    and the points are timed within their own limit (8 s: the first in-process point of a loaded 2-core runner
    pays one-off costs of a few seconds; the training outlasts it by 1 s)."""
    import harness.training as training
    from harness.records import load

    calls = []
    real_fit = training.fit

    def slow_fit(*args, **kwargs):  # a training run longer than the points' whole timeout
        calls.append(1)
        time.sleep(9.0)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", slow_fit)
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    code = run_harness(
        "run", "-m", "device=cpu", "workload.batch_size=1,2", "model=tiny", "model.dim=64", "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2", "model.intermediate_size=128", "train.steps=2", "train.batch_size=2", "train.seq_len=32",
        "train.warmup_steps=1", "measure=quick", "measure.max_reps=3", "measure.timeout_s=8", "workload.prompt_len=16",
        "workload.gen_len=4", "quality.enabled=false", "roofline.enabled=false", "monitor.enabled=false",
        f"cache_dir={cache}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    df = load(sweep)
    assert code == 0 and list(df.status) == ["ok", "ok"], df[["status", "error"]]
    assert len(calls) == 1 and len(list((cache / "checkpoints").glob("*.safetensors"))) == 1
    records = sorted((json.loads(p.read_text()) for p in sweep.glob("*/record.json")), key=lambda r: r["sweep"]["job"])
    assert records[0]["cache_build_s"] > 9.0 and "cache_build_s" not in records[1]
    assert records[0]["reference"]["training"]["build_s"] > 9.0
    assert all(r["timing"]["reps"] == 3 for r in records)


class _Child:
    """A stand-in for an isolated point's process that runs ``work_s`` seconds and builds a cache entry (reported
    through ``shared`` as the real child does) during the first ``build_s`` of them."""

    def __init__(self, work_s: float, build_s: float, shared: list[float]) -> None:
        self.t0, self.work_s, self.build_s, self.shared = time.monotonic(), work_s, build_s, shared
        shared[0] = 1.0 if build_s else 0.0

    def _tick(self) -> None:
        if self.shared[0] and time.monotonic() - self.t0 >= self.build_s:
            self.shared[0], self.shared[1] = 0.0, self.build_s

    def is_alive(self) -> bool:
        self._tick()
        return time.monotonic() - self.t0 < self.work_s

    def join(self, timeout: float | None = None) -> None:
        time.sleep(min(timeout or 0.05, 0.05))


def test_an_isolated_point_is_not_killed_while_it_builds_a_cache_entry():
    """The parent keeps an isolated point's deadline: a child building a shared entry (1 s, longer than the 0.4 s
    limit) is waited for, and the limit then counts its own time only; one that overruns its own time is killed."""
    from harness.isolation import wait_for

    t0 = time.monotonic()
    shared = [0.0, 0.0]
    assert wait_for(_Child(work_s=1.2, build_s=1.0, shared=shared), 0.4, shared) is False  # 0.2 s of its own
    shared = [0.0, 0.0]
    assert wait_for(_Child(work_s=1.8, build_s=1.0, shared=shared), 0.4, shared) is True  # 0.8 s of its own
    shared = [0.0, 0.0]
    assert wait_for(_Child(work_s=0.8, build_s=0.0, shared=shared), 0.4, shared) is True  # no build: 0.4 s
    assert time.monotonic() - t0 < 6.0
