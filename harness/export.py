"""Exports of a sweep's table, and the reader the gate uses for results directories and exported tables.

Formats (``harness export DIR --format ...``):

* ``json``: ``{"format": "llm-inference-harness.table", "version": 1, "rows": [...]}``, one row per point with
  every table column plus ``samples.<metric>`` (the raw samples) and ``policy.<field>``: lossless for the
  gate, ``harness compare`` reads it like a results directory.
* ``parquet``: the same rows and columns (samples as list columns); needs pyarrow.
* ``csv``: the flat table only (no raw samples: a CSV cell cannot hold a list). ``harness compare`` on a CSV
  degrades to threshold-and-CI verdicts and says so in every reason.
* ``pytest-benchmark``: the JSON ``pytest --benchmark-json`` writes, one benchmark per point and timed metric,
  readable by ``pytest-benchmark compare`` and github-action-benchmark (``tool: 'pytest'``). Every benchmark
  is a time per operation in seconds, as pytest-benchmark assumes: ``stats.data`` holds one value per
  repetition (TTFT, TPOT, E2E: seconds per repetition; ITL: every gap; ``decode_tokens_per_s``: TPOT / batch,
  seconds per generated token), the stats are computed from it exactly as pytest-benchmark does, and
  ``stats.ops`` = 1 / mean, which github-action-benchmark charts as "iter/sec" (higher is better): for
  latencies it is repetitions (or tokens) per second, for ``decode_tokens_per_s`` it is tokens/s. Only ok
  points with representative timings are exported (counted in ``harness.left_out``).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import statistics
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.progress import SWEEP_META, missing_points
from harness.records import (
    FLAG_STATS,
    NUMERIC_COLUMNS,
    RECORD_NAME,
    STAT_COLUMNS,
    TIMED_METRICS,
    RecordError,
    find_records,
    json_safe,
    key_and_status,
    load,
    read_record,
    write_json_atomic,
)

log = logging.getLogger(__name__)

FORMATS = ("pytest-benchmark", "csv", "parquet", "json")
# exports that keep the unreadable records' and missing points' messages, so a gate reading them still exits 2
CARRY_ERRORS = (".json", ".parquet")
TABLE_FORMAT = "llm-inference-harness.table"
TABLE_VERSION = 1
SAMPLE_PREFIX = "samples."
POLICY_PREFIX = "policy."
ENV_PREFIX = "env."
# fingerprint fields the table lacks, for pytest-benchmark's machine_info
ENV_FIELDS = {"cpu_model": ("cpu_model",), "cpu_count_logical": ("cpu_count_logical",), "python": ("python",),
              "platform": ("platform",), "git_dirty": ("git", "dirty")}  # fmt: skip
# identifiers a CSV reader would otherwise take for numbers: fingerprint 123e45678901 is a float, a key of digits
# loses its leading zeros, and the points no longer match (or their environments "differ")
TEXT_COLUMNS = ("point_key", "fingerprint", "git_sha", "turns_id", "hostname", "model_id", "variant", "engine",
                "model", "device", "dtype", "device_name", "started_at", "timing_representative")  # fmt: skip
DEFAULT_NAMES = {"pytest-benchmark": "pytest-benchmark.json", "csv": "table.csv", "parquet": "table.parquet",
                 "json": "table.json"}  # fmt: skip


class ExportError(ValueError):
    """Nothing to read or write (missing path, no records, unknown file); the message names the path."""


def table_with_samples(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """``harness.records.load()`` plus the raw samples (``samples.<metric>`` lists), the measurement policy
    (``policy.<field>``) and a few fingerprint fields (``env.<field>``) of each point. Unreadable records are
    skipped and listed in ``df.attrs["errors"]``."""
    try:
        found = find_records(paths)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    where = ", ".join(map(str, [paths] if isinstance(paths, str | Path) else paths))
    if not found:
        raise ExportError(f"{where}: no record.json found (is this a sweep or run directory?)")
    df = load(found)
    if df.empty:
        raise ExportError(f"{where}: none of the {len(found)} record(s) could be read")
    extra = []
    for path in df["record_path"]:
        try:
            rec = read_record(Path(path))
        except RecordError:  # replaced since load(): keep the row, without samples
            rec = {}
        row: dict[str, Any] = {SAMPLE_PREFIX + k: list(v) for k, v in (rec.get("samples") or {}).items()}
        policy = (rec.get("timing") or {}).get("policy") or {}
        row.update({POLICY_PREFIX + k: v for k, v in policy.items() if not isinstance(v, dict | list)})
        for name, path in ENV_FIELDS.items():
            node: Any = rec.get("env") or {}
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            row[ENV_PREFIX + name] = node
        extra.append(row)
    extra_df = pd.DataFrame(extra, index=df.index)
    out = pd.concat([df, extra_df], axis=1)
    out.attrs["errors"] = df.attrs.get("errors", [])
    return out


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Column types as ``records.load`` gives them, for tables read back from a file."""
    numeric = NUMERIC_COLUMNS | {f"{m}_{s}" for m in TIMED_METRICS for s in STAT_COLUMNS if s not in FLAG_STATS}
    for col in numeric & set(df.columns):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def read_points(path: str | Path) -> pd.DataFrame:
    """The points of one side of a comparison: a results directory or record.json (records), or a table
    exported as json, parquet or csv. ``df.attrs["errors"]`` names unreadable records; ``df.attrs["source"]``
    says what was read."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if path.is_dir() or path.name.endswith(".json") and _is_record(path):
        df = table_with_samples(path)
        df.attrs["errors"] = list(df.attrs.get("errors", [])) + missing_errors(path)
        df.attrs["source"] = "records"
        return df
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            df, errors = _read_json_table(path)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
            errors = [str(e) for e in df.attrs.get("errors", [])]  # pandas keeps attrs in the file's metadata
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
        else:
            raise ExportError(f"{path}: not a results directory, record.json or exported table (.json .parquet .csv)")
    except (OSError, ValueError, ImportError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(
            f"{path}: cannot read table ({exc.__class__.__name__}: {' '.join(str(exc).split())})"
        ) from None
    if df.empty or "status" not in df.columns:
        raise ExportError(f"{path}: the table has no points")
    df = _normalize(df)
    df.attrs["errors"], df.attrs["source"] = errors if suffix in CARRY_ERRORS else [], suffix.lstrip(".")
    return df


def missing_errors(path: Path) -> list[str]:
    """The points a sweep planned (sweep.json) that have no record, for every sweep under ``path``: a sweep killed
    part-way must not pass a gate as "no regression" for the points it never wrote."""
    path = Path(path)
    if not path.is_dir():
        return []
    return [
        f"{sweep}: job {m['job']} ({' '.join(m['overrides'] or []) or 'no overrides'}) planned in {SWEEP_META} "
        "has no record (the sweep stopped before it)"
        for sweep in sorted({meta.parent for meta in path.rglob(SWEEP_META)})
        for m in missing_points(sweep)
        if not _unreadable(Path(m["job_dir"]) / RECORD_NAME)  # named once already, as unreadable
    ]


def _unreadable(path: Path) -> bool:
    return path.is_file() and key_and_status(path) is None


def _is_record(path: Path) -> bool:
    try:
        head = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return path.name == "record.json"  # let the record reader name the problem
    return isinstance(head, dict) and "schema_version" in head


def _read_json_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("rows"), list):
        raise ExportError(f"{path}: not a harness table export (expected format {TABLE_FORMAT!r} with rows)")
    if data.get("version", 0) > TABLE_VERSION:
        raise ExportError(f"{path}: table version {data['version']} is newer than this harness ({TABLE_VERSION})")
    errors = data.get("errors") or []
    rows = restore_nonfinite(data["rows"], data.get("nonfinite") or [])
    return pd.DataFrame(rows), [str(e) for e in errors] if isinstance(errors, list) else [str(errors)]


INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def _inf_text(value: float) -> str:
    return "inf" if value > 0 else "-inf"


def encode_nonfinite(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """JSON has no infinity: the table export writes an infinite cell (a perplexity that overflowed, a regression)
    as null and lists it beside the rows as ``[row, column, "inf" | "-inf"]``, which the reader puts back. A
    null alone would read back as "not measured"."""
    marks = []
    for i, row in enumerate(rows):
        for col, value in row.items():
            if isinstance(value, float) and math.isinf(value):
                marks.append([i, col, _inf_text(value)])
                row[col] = None
    return rows, marks


def restore_nonfinite(rows: list[dict[str, Any]], marks: list[Any]) -> list[dict[str, Any]]:
    """The rows of a table export with the infinite cells ``encode_nonfinite`` listed put back."""
    for mark in marks:
        if isinstance(mark, list) and len(mark) == 3 and mark[2] in INFINITIES and isinstance(mark[0], int):
            if 0 <= mark[0] < len(rows) and isinstance(rows[mark[0]], dict):
                rows[mark[0]][str(mark[1])] = INFINITIES[mark[2]]
    return rows


def strict_json(obj: Any) -> Any:
    """``obj`` as strict JSON (RFC 8259, what JavaScript and Go parsers accept): NaN becomes null and an infinity
    the string "inf" or "-inf" (an infinite change is the worst regression: it must not break the parser)."""
    return json_safe(obj, infinity_as_text=True)


def _cell(value: Any) -> Any:
    """A JSON-ready cell: arrays become lists, pandas' missing markers None."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple | dict):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def table_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _cell(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (an engine parameter that is a number for one engine and text for
    another) become text, so pyarrow can type them; sample lists stay lists."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype != object or col.startswith(SAMPLE_PREFIX):
            continue
        kinds = {type(v) for v in out[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1:
            out[col] = out[col].map(lambda v: None if v is None or v != v else str(v))
    return out


def write(df: pd.DataFrame, fmt: str, out: Path, metrics: Iterable[str] | None = None) -> dict[str, Any]:
    """Write ``df`` (from ``table_with_samples``) as ``fmt`` to ``out``; returns what was written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pytest-benchmark":
        data = pytest_benchmark_json(df, metrics)
        write_json_atomic(out, data)
        return {"points": data["harness"]["points"], "benchmarks": len(data["benchmarks"]),
                "left_out": data["harness"]["left_out"]}  # fmt: skip
    if fmt == "json":
        meta = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "exported_at": datetime.now(UTC).isoformat()}
        rows, marks = encode_nonfinite(table_rows(df))
        write_json_atomic(out, {**meta, "errors": df.attrs.get("errors", []), "nonfinite": marks, "rows": rows})
    elif fmt in ("parquet", "csv"):
        from harness.records import write_bytes_atomic

        # serialized in memory, then a temp file in out's directory renamed over out: never a partial file
        if fmt == "parquet":
            data: bytes | str = _parquet_safe(df).to_parquet(None, index=False)
        else:
            data = df[[c for c in df.columns if not c.startswith(SAMPLE_PREFIX)]].to_csv(index=False)
        write_bytes_atomic(out, data)
    else:
        raise ExportError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return {"points": len(df)}


# --- pytest-benchmark ------------------------------------------------------------------------------------------

PYTEST_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "decode_tokens_per_s")
PYTEST_BENCHMARK_VERSION = "5.3.1"  # the pytest-benchmark release whose JSON layout this follows


def _quartiles(d: list[float]) -> tuple[float, float]:
    """pytest-benchmark's quartiles (its ``Stats.q1``/``q3``: methods 3 and 2 of Wikipedia's quartile page)."""
    n = len(d)
    if n == 1:
        return d[0], d[0]
    if n % 2:
        k = n // 4
        if n % 4 == 1:
            return 0.25 * d[k - 1] + 0.75 * d[k], 0.75 * d[3 * k] + 0.25 * d[3 * k + 1]
        return 0.75 * d[k] + 0.25 * d[k + 1], 0.25 * d[3 * k + 1] + 0.75 * d[3 * k + 2]
    return statistics.median(d[: n // 2]), statistics.median(d[n // 2 :])


def pytest_stats(data: list[float]) -> dict[str, Any]:
    """The ``stats`` object of one benchmark, field for field as pytest-benchmark computes it."""
    d = sorted(data)
    n, total, mean = len(d), math.fsum(d), statistics.mean(d)
    stddev = statistics.stdev(d) if n > 1 else 0
    q1, q3 = _quartiles(d)
    iqr = q3 - q1
    lo, hi = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    sd_out = sum(1 for v in d if v < mean - stddev or v > mean + stddev)
    iqr_out = sum(1 for v in d if v < lo or v > hi)
    return {
        "min": d[0], "max": d[-1], "mean": mean, "stddev": stddev, "rounds": n, "median": statistics.median(d),
        "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": iqr_out, "stddev_outliers": sd_out,
        "outliers": f"{sd_out};{iqr_out}",
        "ld15iqr": d[0] if n == 1 else d[bisect.bisect_left(d, lo)],
        "hd15iqr": d[0] if n == 1 else d[bisect.bisect_right(d, hi) - 1],
        "ops": n / total if total else 0, "total": total, "data": list(data), "iterations": 1,
    }  # fmt: skip


def _param(row: dict[str, Any]) -> str:
    """Stable, readable and unique: the point's identity and the first 8 hex digits of its key."""
    beam = f"-beam{int(row['num_beams'])}" if row.get("decoding") == "beam" else ""
    return (f"{row['variant']}-{row['model']}-b{int(row['batch_size'])}-p{int(row['prompt_len'])}"
            f"-g{int(row['gen_len'])}{beam}-{row['device']}-{row['dtype']}-{str(row['point_key'])[:8]}")  # fmt: skip


def _seconds(row: dict[str, Any], metric: str) -> list[float] | None:
    source = "tpot_ms" if metric == "decode_tokens_per_s" else metric
    raw = row.get(SAMPLE_PREFIX + source)
    if raw is None or isinstance(raw, float | str) or len(raw) == 0:
        return None
    per = 1000.0 * (float(row["batch_size"]) if metric == "decode_tokens_per_s" else 1.0)
    return [float(v) / per for v in raw]


IDENTITY = ("variant", "model", "batch_size", "prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype",
            "seed", "point_key")  # fmt: skip
EXTRA_INFO = ("fidelity_top1", "fidelity_kl", "ppl", "peak_memory_mb", "n_reps", "stop_reason", "fingerprint")


def _benchmark(row: dict[str, Any], metric: str, data: list[float]) -> dict[str, Any]:
    """One pytest-benchmark entry: ``group`` is the metric, so ``pytest-benchmark compare`` tables one metric
    at a time; ``extra_info.harness_value`` is the harness' own figure (median ms, or tokens/s)."""
    param = _param(row)
    per_token = metric == "decode_tokens_per_s"
    return {
        "group": metric,
        "name": f"{metric}[{param}]",
        "fullname": f"harness::{metric}[{param}]",
        "params": {k: row.get(k) for k in IDENTITY},
        "param": param,
        "extra_info": {
            "metric": metric,
            "unit": "seconds per generated token" if per_token else "seconds",
            "harness_value": row.get(metric if per_token else f"{metric}_p50"),
            **{k: row.get(k) for k in EXTRA_INFO},
        },
        "options": {
            "disable_gc": row.get(POLICY_PREFIX + "disable_gc"),
            "timer": row.get("clock"),
            "min_rounds": row.get(POLICY_PREFIX + "min_reps"),
            "max_time": row.get(POLICY_PREFIX + "max_time_s"),
            "min_time": None,
            "warmup": True,
        },
        "stats": pytest_stats(data),
    }


def _machine_info(row: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys, filled from the measuring machine's fingerprint."""
    return {
        "node": row.get("hostname"),
        "processor": row.get(ENV_PREFIX + "cpu_model"),
        "machine": row.get("device"),
        "python_compiler": "",
        "python_implementation": "CPython",
        "python_implementation_version": row.get(ENV_PREFIX + "python"),
        "python_version": row.get(ENV_PREFIX + "python"),
        "python_build": [],
        "release": "",
        "system": row.get(ENV_PREFIX + "platform"),
        "cpu": {"brand_raw": row.get(ENV_PREFIX + "cpu_model"), "count": row.get(ENV_PREFIX + "cpu_count_logical")},
        "device": row.get("device_name"),
        "harness_fingerprint": row.get("fingerprint"),
    }


def latest_per_point(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per ``point_key``, the latest by start time (a point re-run into a sweep, as the gate takes it):
    benchmark names must be unique, or github-action-benchmark puts both on one series. Second: the rows left
    out (point key, start, record path)."""
    if "point_key" not in df.columns or df.empty:
        return df, []
    started = pd.to_datetime(df["started_at"] if "started_at" in df.columns else pd.Series(None, index=df.index),
                             utc=True, errors="coerce", format="ISO8601")  # fmt: skip
    order = started.sort_values(na_position="first", kind="stable").index
    keep = ~df.loc[order, "point_key"].duplicated(keep="last")
    older = df.loc[order][~keep]
    cols = [c for c in ("point_key", "started_at", "record_path") if c in df.columns]
    return df.loc[order][keep].sort_index(), table_rows(older[cols])


def pytest_benchmark_json(df: pd.DataFrame, metrics: Iterable[str] | None = None) -> dict[str, Any]:
    """The document ``pytest --benchmark-json`` would write, one benchmark per point and timed metric."""
    metrics = list(metrics or PYTEST_METRICS)
    bad = [m for m in metrics if m not in PYTEST_METRICS]
    if bad:
        allowed = ", ".join(PYTEST_METRICS)
        raise ExportError(f"--metric {', '.join(bad)}: pytest-benchmark holds times only; allowed: {allowed}")
    df, older = latest_per_point(df)
    ok = df["status"].eq("ok")
    rep = ~df["timing_representative"].astype(str).str.lower().eq("false")
    benchmarks = []
    for row in table_rows(df[ok & rep]):
        for metric in metrics:
            data = _seconds(row, metric)
            if data is not None:
                benchmarks.append(_benchmark(row, metric, data))
    first = table_rows(df.head(1))[0]
    return {
        "machine_info": _machine_info(first),
        "commit_info": {
            "id": first.get("git_sha") or "unversioned",
            "time": None,
            "author_time": None,
            "dirty": first.get(ENV_PREFIX + "git_dirty"),
            "project": "llm-inference-harness",
            "branch": "(unknown)",
        },
        "benchmarks": benchmarks,
        "datetime": datetime.now(UTC).isoformat(),
        "version": PYTEST_BENCHMARK_VERSION,
        "harness": {
            "points": int((ok & rep).sum()),
            "left_out": {
                "not ok": int((~ok).sum()),
                "timing not representative": int((ok & ~rep).sum()),
                "older record of a re-run point": len(older),
            },
            "superseded": older,
            "metrics": metrics,
        },
    }
