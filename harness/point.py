"""One point end to end: reference model -> engine.prepare -> warm-up -> timed generations -> record.

A point never raises (except for an invalid config, caught before any work): an unavailable engine is
``skipped`` with its reason, running out of memory is ``oom``, any other exception is ``failed`` with its
message and traceback, and the record is written in every case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.base import PrepareContext, engine_info, weight_bytes
from engines.generate import cache_rows, generate, setup_caches
from harness import fidelity, reference
from harness.config import PointSpec
from harness.corpus import Corpus, CorpusError, load_corpus, windows
from harness.env import fingerprint
from harness.isolation import PointTimeout, deadline, paused_s
from harness.memory import PeakMemory, current_rss_mb
from harness.monitor import Sampler
from harness.profiling import profile_decode
from harness.records import point_key, write_record
from harness.roofline import device_peaks, roofline, unread_table_bytes
from harness.stats import summarize
from harness.timing import Repetitions, make_clock, repeat
from harness.training import checkpoint_key, resolved_train

log = logging.getLogger(__name__)


def identity(spec: PointSpec) -> dict[str, Any]:
    """What the point measures; its hash is the point key that matches points across sweeps.

    Trained weights add ``training`` (what made them: ``training_identity``); random-weight points have none, so
    their keys are those of older records, except where the engine calibrates on the corpus (``corpus_sha256``).
    How the point is measured (``measure`` policy, monitor, profiling) and ``note`` stay out: the same point
    measured differently keeps its key."""
    w = spec.workload
    ident = {
        "engine": spec.engine.name,
        "variant": spec.engine.variant(),
        "engine_params": spec.engine.param_dict(),
        "model": spec.model.name,
        "weights": spec.model.weights,
        "model_args": spec.model.args.to_dict(),
        "n_params": spec.model.args.num_params(),
        "batch_size": w.batch_size,
        "prompt_len": w.prompt_len,
        "gen_len": w.gen_len,
        "decoding": w.decoding,
        "num_beams": w.num_beams,
        "device": spec.device.type,
        "dtype": spec.dtype_name,
        "seed": spec.seed,
        **({"threads": spec.threads} if spec.threads else {}),  # absent for auto: keys of older points hold
    }
    if spec.model.weights == "trained":
        ident["training"] = training_identity(spec)
    elif spec.engine.reads_corpus():  # calibration reads the corpus: another corpus prunes other weights
        try:
            ident["corpus_sha256"] = load_corpus(spec.corpus.path, spec.corpus.heldout_every).sha256
        except CorpusError as exc:  # the point fails on it when it loads the corpus; its key still names it
            ident["corpus"] = {"path": spec.corpus.path, "error": str(exc)}
    return ident


def training_identity(spec: PointSpec) -> dict[str, Any]:
    """What trained weights are made of: the corpus (its sha256), the training config as resolved on this device
    (``precision=auto`` becomes fp32 or bf16), and the checkpoint cache's key over them
    (``harness.training.checkpoint_key``): two points share it exactly when they load the same checkpoint."""
    train = resolved_train(spec.train, spec.device)
    try:
        corpus = load_corpus(spec.corpus.path, spec.corpus.heldout_every)
    except CorpusError as exc:  # the point fails on it when it loads the corpus; its key still names the inputs
        return {"corpus": {"path": spec.corpus.path, "error": str(exc)}, "train": asdict(train)}
    return {
        "corpus_sha256": corpus.sha256,
        "train": asdict(train),
        "checkpoint_key": checkpoint_key(spec.model.args, corpus, train, spec.seed, spec.device.type),
    }


DEFAULT_THREADS = torch.get_num_threads()


def apply_process_settings(spec: PointSpec) -> None:
    """Set torch's intra-op thread count for this point (auto: back to the process default) and, on CUDA, the
    current device: CUDA events record on the current device's stream and Triton launches on it, so
    ``device=cuda:1`` with cuda:0 current would time an idle stream and run kernels on another GPU."""
    torch.set_num_threads(spec.threads or DEFAULT_THREADS)
    if spec.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(spec.device)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _prompt(spec: PointSpec, rep: int, heldout: torch.Tensor | None) -> torch.Tensor:
    """Fresh inputs for each repetition (never zeros), from a seed fixed by the point and the repetition:
    held-out corpus text when the model was trained on it, random token ids otherwise."""
    w, seed = spec.workload, spec.seed * 1_000_003 + rep + 2**31
    if heldout is not None:
        return windows(heldout, w.batch_size, w.prompt_len, seed).to(spec.device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, spec.model.args.vocab_size, (w.batch_size, w.prompt_len), generator=gen).to(spec.device)


def _quality_key(spec: PointSpec) -> str:
    """The prepared engine's identity (with the corpus it calibrated on) and the quality inputs' config."""
    return json.dumps([reference.prepared_key(spec), spec.quality.__dict__], sort_keys=True, default=str)


def _quality(spec: PointSpec, model, prepared, corpus: Corpus, trained: bool) -> dict[str, Any]:
    q = spec.quality
    if trained:
        win = windows(corpus.tokens("heldout"), q.n_seqs, q.seq_len, spec.seed)
        prompts = windows(corpus.tokens("heldout"), q.greedy_prompts, q.greedy_prompt_len, spec.seed + 1)
    else:
        gen = torch.Generator().manual_seed(spec.seed)
        vocab = spec.model.args.vocab_size
        win = torch.randint(1, vocab, (q.n_seqs, q.seq_len), generator=gen)
        prompts = torch.randint(1, vocab, (q.greedy_prompts, q.greedy_prompt_len), generator=gen)
    reference_id = json.dumps([reference.reference_key(spec), q.__dict__], sort_keys=True, default=str)
    out = fidelity.evaluate(
        _quality_key(spec), model, prepared, win.to(spec.device), prompts.to(spec.device), q.greedy_len, trained,
        reference_id=reference_id, decode=q.decode_positions,
    )  # fmt: skip
    return out


def _quality_inputs(spec: PointSpec, corpus: Corpus, trained: bool) -> dict[str, Any]:
    """What the quality section says it scored (also on a point whose quality was memoized by an earlier one)."""
    held = corpus.identity()
    out: dict[str, Any] = {"inputs": "corpus held-out text" if trained else "random token ids"}
    if trained:
        out["corpus"] = held
    out["inputs_id"] = quality_inputs_id(spec, [held["sha256"], held["heldout_bytes"]] if trained else None)
    return out


def quality_inputs_id(spec: PointSpec, corpus: Any) -> str:
    """What a point's quality figures were scored on: the quality settings, the seed that draws the windows, the
    corpus (trained weights) or the vocabulary (random ids), and the rows per pass. Two records whose ids differ
    scored other text: their perplexities are not a regression of one another."""
    q = {k: v for k, v in spec.quality.__dict__.items() if k != "enabled"}
    inputs = [q, spec.seed, corpus if corpus is not None else spec.model.args.vocab_size, fidelity.CHUNK_ROWS]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


CONVERGE_ON = ("ttft_ms", "tpot_ms")


@dataclass
class TimedPoint:
    """A point ready to be timed: its prepared engine, one repetition (``rep(i)``) and what ``finish`` needs."""

    spec: PointSpec
    record: dict[str, Any]
    prepared: nn.Module
    rep: Callable[[int], dict[str, Any]]
    clock: Any
    heldout: torch.Tensor | None
    rows: int
    out_dir: Path
    prepare_s: float

    def setup_caches(self) -> None:
        """(Re)allocate the KV caches for this point's workload (another point's quality run may have resized
        the caches of a model it shares, e.g. the eager reference)."""
        w = self.spec.workload
        setup_caches(self.prepared, self.rows, w.prompt_len + w.gen_len)


def setup(spec: PointSpec, record: dict[str, Any], out_dir: Path, keep_reference: bool = False) -> TimedPoint:
    """Prepare the engine and measure its quality; fills the record's reference, engine and quality sections.

    The reference model is built (or loaded) only when this point needs it: to prepare a variant the previous
    point did not already prepare, or to measure quality not yet measured. It is then dropped before the timed
    window unless it is the prepared model itself (eager) or ``keep_reference`` (points timed in turns prepare
    one after another from the same reference), so peak memory is the engine's own.
    """
    w = spec.workload
    trained = spec.model.weights == "trained"
    corpus = load_corpus(spec.corpus.path, spec.corpus.heldout_every)
    prepared, prepare_s = reference.cached_prepared(spec), 0.0
    quality = fidelity.lookup(_quality_key(spec)) if spec.quality.enabled else None
    model = None
    if prepared is None or (spec.quality.enabled and quality is None):
        model, ref_info = reference.reference_model(spec)
        if prepared is None:
            ctx = PrepareContext(
                spec.device, spec.dtype, spec.seed, spec.model.name, spec.model.args, spec.cache_dir,
                reference_key=reference.weights_key(spec, ref_info), trained=trained,
                train_tokens=corpus.tokens("train"), heldout_tokens=corpus.tokens("heldout"),
            )  # fmt: skip
            prepared, prepare_s = reference.prepare(spec, model, ctx)
    else:
        ref_info = reference.reference_info(spec)
    record["reference"] = ref_info
    record["engine_info"] = engine_info(prepared)
    if spec.quality.enabled:
        record["quality"] = {**(quality or _quality(spec, model, prepared, corpus, trained)),
                             **_quality_inputs(spec, corpus, trained)}  # fmt: skip
    del model
    if not keep_reference:
        reference.release_reference(keep=prepared)
    heldout = corpus.tokens("heldout") if trained else None
    rows = cache_rows(w.batch_size, w.decoding, w.num_beams)
    setup_caches(prepared, rows, w.prompt_len + w.gen_len)

    clock = make_clock(spec.device)
    if hasattr(clock, "ensure_capacity"):
        clock.ensure_capacity(w.gen_len)

    def rep(i: int) -> dict[str, Any]:
        prompt = _prompt(spec, i, heldout)
        generate(prepared, prompt, w.gen_len, w.decoding, w.num_beams, clock)
        iv = clock.intervals_ms()
        itl = iv[1:]
        return {"ttft_ms": iv[0], "tpot_ms": float(itl.mean()), "e2e_ms": float(iv.sum()), "itl_ms": itl}

    return TimedPoint(spec, record, prepared, rep, clock, heldout, rows, out_dir, prepare_s)


def measure(spec: PointSpec, record: dict[str, Any], out_dir: Path) -> None:
    """Prepare the engine, measure its quality and time generations; fills the record's sections."""
    peaks = roofline_peaks(spec, record)  # before the model is built: the measurement needs its memory
    point = setup(spec, record, out_dir)
    peak = PeakMemory(spec.device)
    rss_before = current_rss_mb()
    sampler = Sampler(spec.device, spec.monitor.interval_s) if spec.monitor.enabled else None

    @contextmanager
    def timed_window() -> Iterator[None]:
        peak.reset()  # after the warm-up: compilation and autotuning transients are not the engine's footprint
        with sampler or nullcontext():
            yield

    reps = Repetitions()
    try:
        repeat(point.rep, spec.policy, CONVERGE_ON, timed_window=timed_window, res=reps)
    except BaseException:
        keep_partial(record, reps)
        raise
    w = spec.workload
    monitor = sampler.result(tokens=reps.reps * w.batch_size * w.gen_len) if sampler is not None else None
    finish(point, reps, peak.read(), rss_before, monitor, peaks)


def keep_partial(record: dict[str, Any], reps: Repetitions) -> None:
    """The samples a point took before its timing stopped on an exception (a timeout, a failing repetition):
    every raw sample is kept, with ``timing.partial`` saying the loop did not end by its policy."""
    if reps.reps or reps.warmup_times_s:
        record["samples"] = reps.samples
        record["timing"] = {**record.get("timing", {}), **reps.to_dict(), "partial": True}


def roofline_peaks(spec: PointSpec, record: dict[str, Any]) -> dict[str, Any] | None:
    """The device's measured peaks (cached per device and dtype) when the roofline is on. A failure to measure
    them is the roofline section's ``error``: it never fails the point."""
    if not spec.roofline.enabled:
        return None
    try:
        return device_peaks(
            spec.device, spec.dtype, record["env"]["id"], spec.cache_dir,
            {"bandwidth_gbs": spec.roofline.bandwidth_gbs, "tflops": spec.roofline.tflops},
        )  # fmt: skip
    except Exception as exc:  # not PointTimeout (a BaseException): the point's deadline still ends it
        log.warning("roofline peaks could not be measured: %s", _one_line(exc))
        record["roofline"] = {"error": _one_line(exc)}
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def finish(
    point: TimedPoint,
    reps: Repetitions,
    peak: tuple[float, str],
    rss_before: float,
    monitor: dict[str, Any] | None,
    peaks: dict[str, Any] | None,
) -> None:
    """Fill the record's timing, samples, summary, metrics, monitor, roofline and profile sections (``peaks``:
    ``roofline_peaks``, measured before the point's model was built; None: no roofline)."""
    spec, record, prepared, clock = point.spec, point.record, point.prepared, point.clock
    w = spec.workload
    caveat = spec.engine.timing_caveat(spec.device)
    record["timing"] = {
        "clock": clock.kind,
        "overhead_ns": clock.overhead_ns,
        "host_mark_ns": getattr(clock, "host_mark_ns", None),
        "policy": spec.policy.__dict__,
        **reps.to_dict(),
        "representative": caveat is None,
        "caveat": caveat,
        **record.get("timing", {}),
    }
    record["samples"] = reps.samples
    blocks = {"itl_ms": w.gen_len - 1}  # one generation's token gaps come together: its repetition is the unit
    summary = {k: summarize(v, spec.policy.confidence, blocks.get(k)) for k, v in reps.samples.items()}
    record["summary"] = summary
    b = w.batch_size
    wbytes = weight_bytes(prepared)
    peak_mb, peak_method = peak
    metrics = record["metrics"] = {
        "decode_tokens_per_s": b * 1000.0 / summary["tpot_ms"]["p50"],
        "prefill_tokens_per_s": b * w.prompt_len * 1000.0 / summary["ttft_ms"]["p50"],
        "output_tokens_per_s": b * w.gen_len * 1000.0 / summary["e2e_ms"]["p50"],
        "peak_memory_mb": peak_mb,
        "peak_memory_method": peak_method,
        "rss_before_mb": rss_before,
        "weight_bytes": wbytes,
        "model_build_s": record["reference"]["build_s"],
        "prepare_s": point.prepare_s,
        "warmup_s": float(np.sum(reps.warmup_times_s)),
    }
    if monitor is not None:
        record["monitor"] = monitor
        source = monitor["aggregates"].get(monitor["util_source"]) if monitor["util_source"] else None
        metrics["util_mean"] = source["mean"] if source else None
        if monitor.get("window_s") and "shared" not in monitor:
            # the window also holds each repetition's untimed host work (prompt, sync, reading the clock): where
            # that is a large part, utilization and energy per token carry idle time the timings do not
            monitor["timed_fraction"] = float(np.sum(reps.samples["e2e_ms"])) / 1e3 / monitor["window_s"]

        metrics["energy_j_per_token"] = monitor["energy_j_per_token"]
    if peaks is not None:
        roof = record["roofline"] = roofline(
            getattr(prepared, "args", spec.model.args), wbytes, spec.dtype.itemsize, point.rows, w.prompt_len,
            w.gen_len, summary["tpot_ms"]["p50"], summary["ttft_ms"]["p50"], peaks, unread_table_bytes(prepared),
        )  # fmt: skip
        metrics["mbu"], metrics["mfu"] = roof["decode"]["mbu"], roof["prefill"]["mfu"]
    if spec.profile.enabled:
        record["profile"] = _profile(point)


def _profile(point: TimedPoint) -> dict[str, Any]:
    """The record's profile section. Profiling runs after the timed window, so a failure there (a cache too large
    for the model's context, the profiler itself) is the section's ``error`` and the point's timings stand."""
    spec, w = point.spec, point.spec.workload
    try:
        return profile_decode(
            point.prepared, _prompt(spec, 10**6, point.heldout), w.decoding, w.num_beams, point.rows,
            spec.profile.steps, point.out_dir, spec.device, cache_len=w.prompt_len + w.gen_len,
        )  # fmt: skip
    except Exception as exc:  # not PointTimeout (a BaseException): the point's deadline still ends it
        if torch.autograd._profiler_enabled():  # failed between the profiler's start and stop: never leave it on
            torch.autograd._disable_profiler()
        log.warning("profiling failed, the timings stand: %s", _one_line(exc))
        return {"error": _one_line(exc), "steps": spec.profile.steps, "traceback": traceback.format_exc()}


OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Out of memory, whichever way it surfaced: CUDA's error, MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def new_record(spec: PointSpec, sweep: dict[str, Any] | None) -> dict[str, Any]:
    """The record's skeleton: identity, key, config and sweep, before any work."""
    ident = identity(spec)
    return {
        "status": None,
        "error": None,
        "point_key": point_key(ident),
        "identity": ident,
        "config": spec.cfg,
        "sweep": sweep or {},
        "started_at": datetime.fromtimestamp(time.time(), UTC).isoformat(),
    }


@contextmanager
def guarded(record: dict[str, Any]) -> Iterator[None]:
    """Turn a failure of the point into its record's status (``timeout``, ``oom`` or ``failed``, with the
    message and traceback) instead of an exception; what the failure left allocated is released."""
    try:
        yield
    except PointTimeout as exc:
        record["status"], record["error"] = "timeout", str(exc)
        record["traceback"] = traceback.format_exc()
    except Exception as exc:
        record["status"] = "oom" if is_oom(exc) else "failed"
        record["error"], record["traceback"] = _one_line(exc), traceback.format_exc()
    except KeyboardInterrupt as exc:  # Ctrl-C, or a signal taken as one (its name the exception's argument)
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "KeyboardInterrupt"
        record["status"], record["error"] = "failed", f"interrupted ({cause})"
        raise
    finally:
        if record["status"] in ("failed", "oom", "timeout"):
            reference.release()  # whatever the failure left allocated goes, so the next point has the memory


def close_record(record: dict[str, Any], spec: PointSpec, out_dir: Path, started: float) -> None:
    """Write the record (atomically), whatever its status."""
    record.setdefault("env", {})
    record["duration_s"] = time.time() - started
    write_record(out_dir, record)
    if spec.device.type == "cuda":
        torch.cuda.empty_cache()


def run_point(
    spec: PointSpec, out_dir: Path, sweep: dict[str, Any] | None = None, timeout_s: float | None = None
) -> dict[str, Any]:
    """Measure one point and write its record into ``out_dir``; returns the record.

    Never raises for a problem of the point itself: it is recorded as ``skipped`` (engine unavailable here),
    ``oom``, ``timeout`` (``timeout_s`` passed) or ``failed``, memory is released, and the sweep goes on.
    """
    started, paused_before = time.time(), paused_s()
    record = new_record(spec, sweep)
    torch.manual_seed(spec.seed)
    apply_process_settings(spec)
    try:
        with guarded(record), deadline(timeout_s):
            record["env"] = fingerprint(spec.device)
            reason = spec.engine.available(spec.device, spec.dtype)
            if reason:
                record["status"], record["error"] = "skipped", reason
            else:
                measure(spec, record, out_dir)
                record["status"] = "ok"
    finally:
        if built := paused_s() - paused_before:  # shared cache entries built (training, a student): not timed out
            record["cache_build_s"] = built
        close_record(record, spec, out_dir, started)
    return record
