"""Shared fixtures: small model shapes, a composed-config factory, a harness runner, test-only engines, and one
real sweep that the report tests share."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from engines.base import Engine, register
from engines.llama import ModelArgs, Transformer
from harness.paths import config_dir

REPO = Path(__file__).resolve().parent.parent
# The one fast point every run test starts from: the CPU (CPU-only assertions hold on a CUDA machine too), random
# weights, no quality pass, fixed roofline peaks (nothing measures the machine's peaks: test_roofline does, mocked),
# the quick policy and a short workload. A test that checks one of these features opts back in after it
# (`quality.enabled=true`, `model.weights=trained`, `roofline.bandwidth_gbs=null`): Hydra's last override wins.
FAST_POINT = [
    "device=cpu",
    "model.weights=random",
    "quality.enabled=false",
    "roofline.bandwidth_gbs=20",
    "roofline.tflops=0.1",
    "measure=quick",
    "workload.prompt_len=16",
    "workload.gen_len=4",
]
QUICK = FAST_POINT
MALICIOUS = "<script>window.__pwned=1</script>"


@dataclass(frozen=True)
class FailParams:
    phase: str = "prepare"


@register
class FailingEngine(Engine):
    """Test-only engine that breaks in a chosen phase."""

    name = "failing-test"
    Params = FailParams

    def prepare(self, model, ctx):
        if self.params.phase == "prepare":
            raise RuntimeError("injected failure <in prepare>")
        if self.params.phase == "oom":
            raise MemoryError("injected out of memory")
        return model


@dataclass(frozen=True)
class NoParams:
    pass


@register
class UnrepresentativeEngine(Engine):
    """Test-only engine whose timings the harness must show but never rank (like an interpreted kernel)."""

    name = "unranked-test"
    Params = NoParams

    def timing_caveat(self, device):
        return "test engine: kernels run by an interpreter"

    def prepare(self, model, ctx):
        return model


WORK_DIM = 32


def work_unit_s() -> float:
    """Median seconds of one work unit (a WORK_DIM^2 matmul on the CPU), for the overshoot correction."""
    a = torch.randn(WORK_DIM, WORK_DIM)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            torch.mm(a, a)
        times.append((time.perf_counter() - t0) / 200)
    return float(sorted(times)[2])


@dataclass(frozen=True)
class SlowParams:
    slowdown: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.slowdown <= 10.0:
            raise ValueError(f"engine.slowdown: must be within [0, 10], got {self.slowdown}")


class SlowedModel(torch.nn.Module):
    """The reference model plus real extra work after each forward: small matmuls, repeated until ``slowdown``
    times the forward's own wall time has passed (CUDA: synchronized first, so the forward's time is known).
    The extra time is measured work, not a constant: it scales with the forward and competes for the CPU as
    real work does, so a 10% slowdown shows as ~10% on TTFT, TPOT and ITL alike. On CUDA the work runs on the
    host while the device idles, which the event clock measures the same way."""

    def __init__(self, model: torch.nn.Module, slowdown: float, unit_s: float) -> None:
        super().__init__()
        self.model = model
        self.slowdown = slowdown
        self.unit_s = unit_s
        self._work = torch.randn(WORK_DIM, WORK_DIM, generator=torch.Generator().manual_seed(0))
        self.engine_info = {"slowdown": slowdown, "work_unit_us": unit_s * 1e6}

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        self.model.setup_caches(max_batch_size=max_batch_size, max_seq_length=max_seq_length)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.slowdown <= 0:
            return self.model(tokens, input_pos)
        t0 = time.perf_counter()
        out = self.model(tokens, input_pos)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        t1 = time.perf_counter()
        # stop half a work unit early: the last unit overshoots the target by half a unit on average
        deadline = t1 + self.slowdown * (t1 - t0) - self.unit_s / 2
        while time.perf_counter() < deadline:
            torch.mm(self._work, self._work)
        return out


@register
class SlowedEngine(Engine):
    """Test-only engine that is slower than eager by a known fraction: ``engine.slowdown=0.1`` adds 10% real
    work to every forward (see ``SlowedModel``). For gate calibration (an injected regression the harness must
    measure) and for any test that needs two variants with a known speed ratio; ``slowdown=0`` is eager plus a
    negligible wrapper."""

    name = "slowed-test"
    Params = SlowParams

    def prepare(self, model, ctx):
        return SlowedModel(model, self.params.slowdown, work_unit_s())


@pytest.fixture(scope="session")
def small_args() -> ModelArgs:
    """A shape that runs in milliseconds: GQA 4:2, untied embeddings, odd intermediate size."""
    return ModelArgs(
        vocab_size=97,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=150,
        max_seq_len=128,
        tie_embeddings=False,
    )


@pytest.fixture(scope="session")
def small_model(small_args) -> Transformer:
    return Transformer.build(small_args, seed=0)


@pytest.fixture()
def compose_cfg():
    """Compose the real config tree with overrides (no job runs)."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def _run_in_process(*args: str) -> int:
    from harness.cli import main

    GlobalHydra.instance().clear()
    try:
        return main(list(args))
    finally:
        GlobalHydra.instance().clear()
        # Hydra configures logging per job; leave pytest's handlers as they were
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if "pytest" in type(h).__module__]


def _reset_process_state(threads: int) -> None:
    """What in-process runs leave behind for the next test: the reference and prepared-engine caches and the
    quality memo (their keys leave out cache_dir, so a later test could reuse this one's engine and quality and
    never run prepare or the quality code), and the last point's torch thread count."""
    from harness import fidelity, reference

    reference.release()
    fidelity._memo.clear()
    torch.set_num_threads(threads)


@pytest.fixture()
def run_harness(monkeypatch):
    """Run `harness <args>` in-process (the same code path as the console script); returns the exit code."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    threads = torch.get_num_threads()
    yield _run_in_process
    _reset_process_state(threads)


@dataclass
class Sweep:
    dir: Path
    code: int
    stdout: str
    malicious: str = MALICIOUS


@pytest.fixture(scope="session")
def report_sweep(tmp_path_factory) -> Sweep:
    """One real tiny sweep, shared by the report tests: eager, a non-representative engine and a failing one at
    batch 1 and 2, with a `<script>` tag in a config value. Its report is written by the sweep's callback."""
    sweep = tmp_path_factory.mktemp("report-sweep") / "sweep"
    out = io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("HYDRA_FULL_ERROR", "1")
        code = _run_in_process(
            "run",
            "-m",
            "engine.name=eager,unranked-test,failing-test",
            "model=tiny",
            "model.weights=random",  # the report needs real timings, not a trained model (no training here)
            "workload.batch_size=1,2",
            *QUICK,
            "quality.enabled=true",  # the report's quality section and Pareto front
            f"+note='{MALICIOUS}'",
            f"hydra.sweep.dir={sweep}",
        )
    _reset_process_state(threads)
    return Sweep(sweep, code, out.getvalue())


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Nothing a test runs reads or writes the user's cache: HOME (inherited by subprocesses and isolated points)
    and the harness' default cache directory (``cache_dir: null``) point into a session tmp dir."""
    import harness.config

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setattr(harness.config, "DEFAULT_CACHE_DIR", home / ".cache" / "llm-inference-harness")
        yield home


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    """Tests that run in GitHub Actions must not append to the real job summary (`harness compare` writes to
    $GITHUB_STEP_SUMMARY wherever it is set); a test that checks it sets its own."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture()
def subprocess_env(_isolated_home) -> dict[str, str]:
    """Environment for subprocess runs of the console script, as a user's shell would have it, with the
    session's HOME (its default cache is the session's, never the user's ~/.cache)."""
    env = dict(os.environ, HOME=str(_isolated_home))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


TRAIN_STEPS = 40


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> dict:
    """The `tiny` reference trained briefly (TRAIN_STEPS steps) into a session cache directory. Runs that pass
    ``overrides`` load it from that cache instead of training again."""
    from harness.config import validate
    from harness.corpus import load_corpus
    from harness.training import ensure_trained

    cache = tmp_path_factory.mktemp("cache")
    overrides = ["model=tiny", "model.weights=trained", f"cache_dir={cache}", f"train.steps={TRAIN_STEPS}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        spec = validate(compose(config_name="config", overrides=overrides))
    GlobalHydra.instance().clear()
    # the same call a run makes, so the runs below find this checkpoint in the cache
    path, info = ensure_trained("tiny", spec.model.args, load_corpus(), spec.train, spec.seed, spec.device, cache)
    return {"cache": cache, "path": path, "info": info, "args": spec.model.args.to_dict(), "overrides": overrides}


def _synthetic_point(
    directory: Path,
    *,
    ttft: list[float] | None = None,
    tpot: list[float] | None = None,
    gaps_per_rep: int = 3,
    variant: str = "eager",
    batch_size: int = 1,
    seed: int = 0,
    status: str = "ok",
    error: str | None = None,
    env_id: str = "env-a",
    caveat: str | None = None,
    quality: dict | None = None,
    peak_memory_mb: float = 100.0,
    turns_id: str | None = None,
) -> dict:
    """Write one record that follows docs/record-schema.md, with the given raw samples (ITL gaps are the
    TPOT of each repetition, repeated ``gaps_per_rep`` times, so TPOT stays their mean)."""
    from harness.records import point_key, write_record
    from harness.stats import summarize

    ident = {
        "engine": variant.split("(")[0],
        "variant": variant,
        "engine_params": {},
        "model": "tiny",
        "weights": "random",
        "model_args": {"dim": 64},
        "n_params": 1000,
        "batch_size": batch_size,
        "prompt_len": 16,
        "gen_len": gaps_per_rep + 1,
        "decoding": "greedy",
        "num_beams": 1,
        "device": "cpu",
        "dtype": "fp32",
        "seed": seed,
    }
    record = {
        "status": status,
        "error": error,
        "point_key": point_key(ident),
        "identity": ident,
        "config": {},
        "env": {
            "device_type": "cpu",
            "device_name": "Test CPU",
            "cpu_model": "Test CPU",
            "python": "3.11.7",
            "platform": "Linux",
            "hostname": "test",
            "cpu_count_logical": 2,
            "git": {"sha": "0123abc", "dirty": False},
            "id": env_id,
        },
        "sweep": {"dir": None, "job": seed},
        "started_at": "2026-11-23T12:00:00+00:00",
        "duration_s": 1.0,
    }
    if status == "ok":
        samples = {"ttft_ms": list(ttft), "tpot_ms": list(tpot)}
        samples["itl_ms"] = [t for t in tpot for _ in range(gaps_per_rep)]
        samples["e2e_ms"] = [a + b * gaps_per_rep for a, b in zip(ttft, tpot, strict=True)]
        summary = {k: summarize(v) for k, v in samples.items()}
        record |= {"samples": samples, "summary": summary}
        record["timing"] = {
            "clock": "perf_counter_ns",
            "reps": len(tpot),
            "representative": caveat is None,
            "caveat": caveat,
            "policy": {"min_reps": 5, "max_time_s": 2.0, "disable_gc": True},
        }
        if turns_id is not None:  # timed in turns with the other points carrying this id (one round per sample)
            record["timing"]["interleaved"] = {"id": turns_id, "points": 2, "position": 0, "rounds": len(tpot)}
        record["metrics"] = {
            "decode_tokens_per_s": batch_size * 1000 / summary["tpot_ms"]["p50"],
            "peak_memory_mb": peak_memory_mb,
        }
        if quality is not None:
            record["quality"] = quality
    write_record(directory, record)
    return record


@pytest.fixture()
def synthetic_point():
    """``synthetic_point(directory, ttft=[...], tpot=[...], **identity and status)`` writes one record."""
    return _synthetic_point
