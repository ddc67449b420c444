"""Point records: one JSON file per point, written atomically, and the flat table built from them.

A record is the complete account of one point (config, identity, environment, raw samples, summaries, status).
``load`` turns any mix of record files and result directories into a pandas DataFrame with one row per point;
report, gate, dashboard and exports read only this table and the records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
STATUSES = ("ok", "failed", "skipped", "oom", "timeout")
TIMED_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
# ci_coverage: the probability that [ci_low, ci_high] holds the median, at least the policy's confidence (95%)
# from 6 samples on; below that the interval is the whole sample range and covers less (3 samples: 75%)
# p99_thin: fewer than 100 samples, so the p99 is in effect the maximum (``stats.P99_MIN_SAMPLES``)
STAT_COLUMNS = ("p50", "p90", "p95", "p99", "mean", "std", "min", "max", "iqr", "ci_low", "ci_high", "ci_coverage",
                "n", "noisy", "p99_thin")  # fmt: skip
FLAG_STATS = frozenset({"noisy", "p99_thin"})  # boolean stats: not coerced to numbers

# Table column -> path inside the record. Figures a later stage fills in are NaN until it does.
SCALAR_COLUMNS: dict[str, tuple[str, ...]] = {
    "status": ("status",),
    "error": ("error",),
    "engine": ("identity", "engine"),
    "variant": ("identity", "variant"),
    "model": ("identity", "model"),
    "weights": ("identity", "weights"),
    "n_params": ("identity", "n_params"),
    "batch_size": ("identity", "batch_size"),
    "prompt_len": ("identity", "prompt_len"),
    "gen_len": ("identity", "gen_len"),
    "decoding": ("identity", "decoding"),
    "num_beams": ("identity", "num_beams"),
    "device": ("identity", "device"),
    "dtype": ("identity", "dtype"),
    "seed": ("identity", "seed"),
    "device_name": ("env", "device_name"),
    # torch intra-op threads the point ran with (config `threads`, or torch's default for auto)
    "threads": ("env", "torch_threads"),
    "decode_tokens_per_s": ("metrics", "decode_tokens_per_s"),
    "prefill_tokens_per_s": ("metrics", "prefill_tokens_per_s"),
    "output_tokens_per_s": ("metrics", "output_tokens_per_s"),
    "peak_memory_mb": ("metrics", "peak_memory_mb"),
    "weight_bytes": ("metrics", "weight_bytes"),
    "util_mean": ("metrics", "util_mean"),
    # the series util_mean is the mean of: gpu_util (NVML: % of time a kernel ran) or cpu_util_process; empty
    # on a GPU point whose NVML could not be read (its host CPU use is cpu_util_mean, never util_mean)
    "util_source": ("monitor", "util_source"),
    "cpu_util_mean": ("monitor", "aggregates", "cpu_util_process", "mean"),
    # GPM's SM activity (% of SM cycles with work; Hopper and newer drivers): how busy the SMs were
    "sm_active_mean": ("monitor", "aggregates", "sm_active", "mean"),
    "energy_j_per_token": ("metrics", "energy_j_per_token"),
    "mbu": ("metrics", "mbu"),
    "mfu": ("metrics", "mfu"),
    # bytes one decode step reads (weights as stored, KV cache, activations): the roofline's count
    "decode_bytes_per_step": ("roofline", "decode", "bytes_per_step"),
    # what a pruned engine really removed (fraction of the selected weights), beside engine.sparsity requested
    "sparsity": ("engine_info", "sparsity"),
    # an engine whose speedup is partly a lower precision than the model's (weight-only CPU schemes on an fp32 model)
    "precision_caveat": ("engine_info", "precision_caveat"),
    "fidelity_top1": ("quality", "top1_agreement"),
    "fidelity_kl": ("quality", "kl"),
    # the same over the positions fed one token at a time through the KV cache (the path TPOT times)
    "fidelity_top1_decode": ("quality", "decode_top1_agreement"),
    "fidelity_kl_decode": ("quality", "decode_kl"),
    # fraction of scored positions whose logits were NaN or +inf: their KL and perplexity are not numbers
    "fidelity_nonfinite": ("quality", "nonfinite_fraction"),
    # how many positions those fractions are over (the gate's floor for a drop in agreement)
    "fidelity_n": ("quality", "n_tokens"),
    "fidelity_n_decode": ("quality", "decode_n_tokens"),
    # the same for the reference's logits: where it is not 0, agreement with the reference means little
    "fidelity_reference_nonfinite": ("quality", "reference_nonfinite_fraction"),
    "ppl": ("quality", "ppl"),
    # what the quality figures were scored on (quality settings, seed, corpus, rows per pass): the gate compares
    # fidelity and perplexity only between points whose ids agree
    "quality_inputs": ("quality", "inputs_id"),
    "timing_representative": ("timing", "representative"),
    "timing_caveat": ("timing", "caveat"),
    "n_reps": ("timing", "reps"),
    "converged": ("timing", "converged"),
    "stop_reason": ("timing", "stop_reason"),
    "clock": ("timing", "clock"),
    # how many points were timed in turns with this one (hydra/launcher=interleaved); NaN: timed on its own
    "timed_in_turns": ("timing", "interleaved", "points"),
    # the same id on two points: timed in the same rounds, so their samples pair up by repetition (harness compare)
    "turns_id": ("timing", "interleaved", "id"),
    # speedup over eager timed in the same rounds: median of the per-round ratios and its 95% CI
    "paired_speedup_tpot": ("timing", "interleaved", "vs_eager", "tpot_ms", "median"),
    "paired_speedup_tpot_ci_low": ("timing", "interleaved", "vs_eager", "tpot_ms", "ci_low"),
    "paired_speedup_tpot_ci_high": ("timing", "interleaved", "vs_eager", "tpot_ms", "ci_high"),
    "paired_speedup_tpot_ci_coverage": ("timing", "interleaved", "vs_eager", "tpot_ms", "coverage"),
    "paired_speedup_ttft": ("timing", "interleaved", "vs_eager", "ttft_ms", "median"),
    "point_key": ("point_key",),
    "fingerprint": ("env", "id"),
    "git_sha": ("env", "git", "sha"),
    "hostname": ("env", "hostname"),
    "started_at": ("started_at",),
    "duration_s": ("duration_s",),
    "sweep_dir": ("sweep", "dir"),
    "job": ("sweep", "job"),
}
NUMERIC_COLUMNS = {
    "n_params",
    "threads",
    "batch_size",
    "prompt_len",
    "gen_len",
    "num_beams",
    "seed",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "output_tokens_per_s",
    "peak_memory_mb",
    "weight_bytes",
    "util_mean",
    "cpu_util_mean",
    "sm_active_mean",
    "energy_j_per_token",
    "mbu",
    "mfu",
    "decode_bytes_per_step",
    "sparsity",
    "fidelity_top1",
    "fidelity_kl",
    "fidelity_top1_decode",
    "fidelity_kl_decode",
    "fidelity_nonfinite",
    "fidelity_reference_nonfinite",
    "fidelity_n",
    "fidelity_n_decode",
    "ppl",
    "n_reps",
    "timed_in_turns",
    "paired_speedup_tpot",
    "paired_speedup_tpot_ci_low",
    "paired_speedup_tpot_ci_high",
    "paired_speedup_tpot_ci_coverage",
    "paired_speedup_ttft",
    "duration_s",
}


class RecordError(ValueError):
    """A record file that cannot be read; the message names the file."""


def point_key(identity: dict[str, Any]) -> str:
    """Stable hash of what the point measures (engine variant and params, model, workload, device type, dtype)."""
    keep = {k: v for k, v in identity.items() if k not in ("n_params",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_id(identity: dict[str, Any]) -> str | None:
    """Short hash of what the model's weights are (shape, weight kind, seed, and for trained weights what trained
    them): two points compare as the same model exactly when it matches. None for a record without a shape."""
    if not isinstance(identity, dict) or not isinstance(identity.get("model_args"), dict):
        return None
    body = {k: identity.get(k) for k in ("model", "model_args", "weights", "seed", "training")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def json_safe(obj: Any, infinity_as_text: bool = False) -> Any:
    """NaN and infinities become null (JSON has no NaN); numpy scalars become Python numbers. With
    ``infinity_as_text`` an infinity is the string "inf" or "-inf" instead (where it must stay readable)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, infinity_as_text) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, infinity_as_text) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return ("inf" if obj > 0 else "-inf") if infinity_as_text and math.isinf(obj) else None
    return obj


def write_bytes_atomic(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to a fresh temporary file in ``path``'s directory,
    fsync it, then rename it over ``path``: readers see the old file or the new one, never a partial one, and two
    concurrent writers each rename a complete file of their own (the last rename wins). The temporary file is
    removed on any error."""
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    target = Path(os.path.realpath(path))  # a symlink's target is what gets replaced, the link stays
    if target.exists() and not target.is_file():  # /dev/stdout, a FIFO: nothing to rename over, write through
        with open(target, "wb") as fh:
            fh.write(payload)
        return path
    target.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name (pid + random, created exclusively) with the process umask: mkstemp would make the file
    # private to its owner, and a report or export is meant to be read by others
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        with open(tmp, "xb") as fh:
            created = True
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if created:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: readers see the old
    file or the new one, never a partial one."""
    return write_bytes_atomic(path, json.dumps(json_safe(data), indent=1, allow_nan=False))


def write_record(directory: Path, record: dict[str, Any]) -> Path:
    record = {"schema_version": SCHEMA_VERSION, **record}
    return write_json_atomic(Path(directory) / RECORD_NAME, record)


def read_record(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or "schema_version" not in data or "status" not in data:
        raise RecordError(f"{path}: not a harness record (no schema_version/status)")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordError(f"{path}: schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"{path}: schema_version {data['schema_version']} is newer than this harness ({SCHEMA_VERSION})"
        )
    data["_path"] = str(path)
    return data


def find_records(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Record files under the given directories (recursively) and the given files, sorted, de-duplicated, as
    absolute paths."""
    if isinstance(paths, str | Path):
        paths = [paths]
    found: dict[Path, Path] = {}  # the file itself -> its path as first named (absolute, links kept)
    for p in map(Path, paths):
        if p.is_dir():
            named = list(p.rglob(RECORD_NAME))
        elif p.exists():
            named = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
        for q in named:  # one directory named two ways (relative, absolute, through a link) is read once
            found.setdefault(q.resolve(), Path(os.path.abspath(q)))
    return sorted(found.values())


# directory -> point key -> its records there, as (path, status), in path order
_index: dict[Path, dict[str, list[tuple[Path, str]]]] = {}


def forget_ok_index() -> None:
    """A new run or sweep starts: index the directory afresh when resume asks."""
    _index.clear()


def key_and_status(path: Path) -> tuple[str, str] | None:
    """(point key, status) of the record at ``path``; None when there is none or it cannot be read."""
    try:
        rec = read_record(path)
    except (RecordError, OSError):
        return None
    key = rec.get("point_key")
    return (str(key), str(rec.get("status"))) if key else None


def earlier_records(directory: Path, key: str) -> list[tuple[Path, str]]:
    """The records of point ``key`` under ``directory`` (path, status): what a resumed sweep finds of its points.

    The directory is indexed once per run or sweep (``forget_ok_index``): the records a resumed sweep writes
    itself are new points. The hits are read again before they are trusted, and the directory indexed afresh when
    one no longer holds a record of ``key`` with that status (replaced or removed since, e.g. by another point of a
    resumed sweep in another order)."""

    def index() -> dict[str, list[tuple[Path, str]]]:
        found: dict[str, list[tuple[Path, str]]] = {}
        for path in find_records(directory) if directory.is_dir() else []:
            held = key_and_status(path)
            if held is not None:
                found.setdefault(held[0], []).append((path, held[1]))
        return found

    directory = Path(directory).resolve()
    if directory not in _index:
        _index[directory] = index()
    hits = _index[directory].get(key, [])
    if any(key_and_status(path) != (key, status) for path, status in hits):
        _index[directory] = index()
        hits = _index[directory].get(key, [])
    return hits


def measured_ok(
    directory: Path, key: str, config: dict[str, Any] | None = None, env: dict[str, Any] | None = None
) -> Path | None:
    """A record under ``directory`` with status ok for point ``key`` (what resume must not measure again). Given
    the point's resolved ``config`` and ``env`` fingerprint, only one measured under the same config (but for
    ``RESUME_IGNORES``), environment id and git SHA: any other is measured again, with one line naming what
    differs, so a report never mixes numbers measured another way as this run's."""
    for path, status in earlier_records(directory, key):
        if status != "ok":
            continue
        if config is None:
            return path
        try:
            differ = record_differences(read_record(path), config, env or {})
        except (RecordError, OSError):
            continue
        if not differ:
            return path
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        log.info("  %s was measured with another %s: measured again (resume=true)", path, shown)
    return None


# config fields that cannot change an ok record's numbers: free text, how the run was launched, where files go
RESUME_IGNORES = ("note", "resume", "hydra", "isolate", "cache_dir", "measure.timeout_s")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.field: value}."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def record_differences(record: dict[str, Any], config: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """What differs between an earlier record and this point: config fields (dotted), ``env.id``, ``env.git.sha``,
    and ``quality`` where this point measures quality and the record holds none."""

    def kept(leaves: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in leaves.items() if not any(k == i or k.startswith(i + ".") for i in RESUME_IGNORES)}

    old, new = kept(_leaves(record.get("config") or {})), kept(_leaves(config))
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    stored = record.get("env") or {}
    if env.get("id") != stored.get("id"):
        differ.append("env.id")
    if (env.get("git") or {}).get("sha") != (stored.get("git") or {}).get("sha"):
        differ.append("env.git.sha")
    if (config.get("quality") or {}).get("enabled", True) and not record.get("quality"):
        differ.append("quality (the record has none)")
    return differ


def _get(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = record
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), infinite where that overflows a float (a badly scaled engine), NaN for NaN."""
    return math.inf if mean_nll > math.log(sys.float_info.max) else math.exp(mean_nll)


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One table row from one record."""
    row: dict[str, Any] = {col: _get(record, path) for col, path in SCALAR_COLUMNS.items()}
    summary = record.get("summary") or {}
    for metric in TIMED_METRICS:
        stats = summary.get(metric) or {}
        for stat in STAT_COLUMNS:
            row[f"{metric}_{stat}"] = stats.get(stat)
    for key, value in (_get(record, ("identity", "engine_params")) or {}).items():
        row[f"engine.{key}"] = value
    for key, value in (_get(record, ("identity", "model_args")) or {}).items():
        row[f"model.{key}"] = value
    nll = _get(record, ("quality", "nll"))
    if row["ppl"] is None and isinstance(nll, int | float) and math.isfinite(nll):  # JSON holds no infinity
        row["ppl"] = perplexity(nll)
    row["model_id"] = model_id(record.get("identity"))
    row["noisy"] = any(bool((summary.get(m) or {}).get("noisy")) for m in ("ttft_ms", "tpot_ms"))
    row["drifting"] = any(bool((summary.get(m) or {}).get("drifting")) for m in ("ttft_ms", "tpot_ms"))
    row["record_path"] = record.get("_path")
    return row


def _flatten_file(path: Path) -> dict[str, Any]:
    """The row of one record file; a record whose parts have the wrong shape (a list where a mapping belongs,
    say) is a RecordError naming the file, like an unreadable one."""
    record = read_record(path)
    try:
        return flatten(record)
    except (TypeError, AttributeError, ValueError) as exc:
        raise RecordError(f"{path}: malformed record ({exc.__class__.__name__}: {exc})") from None


def load(paths: str | Path | Iterable[str | Path], strict: bool = False) -> pd.DataFrame:
    """Load records into a DataFrame, one row per point.

    Unreadable records are skipped with a warning naming each file (``strict=True`` raises instead); their
    messages are kept in ``df.attrs["errors"]``.
    """
    rows, errors = [], []
    for path in find_records(paths):
        try:
            rows.append(_flatten_file(path))
        except RecordError as exc:
            if strict:
                raise
            log.warning("%s", exc)
            errors.append(str(exc))
    return table(rows, errors)


def table(rows: list[dict[str, Any]], errors: Iterable[str] = ()) -> pd.DataFrame:
    """The table from rows made by ``flatten`` (also rows stored elsewhere, e.g. the history database): every
    scalar column present, numeric columns numeric, ``errors`` kept in ``df.attrs["errors"]``."""
    df = pd.DataFrame(rows)
    numeric = NUMERIC_COLUMNS | {f"{m}_{s}" for m in TIMED_METRICS for s in STAT_COLUMNS if s not in FLAG_STATS}
    absent = [c for c in dict.fromkeys((*SCALAR_COLUMNS, "model_id", *sorted(numeric))) if c not in df.columns]
    if absent:  # added in one go: one insert per column fragments the frame
        filler = {c: np.nan if c in numeric else None for c in absent}
        df = pd.concat([df, pd.DataFrame(filler, index=df.index, columns=absent)], axis=1)
    for col in numeric:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # each replaced column is a block of its own: consolidate, or a caller's next column warns of fragmentation
    df = df.copy()
    df.attrs["errors"] = list(errors)
    return df
