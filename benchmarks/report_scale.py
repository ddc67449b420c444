"""Report at scale: build the HTML report of 500 points and print its build time and size.

The points are real records: a small real `tiny` sweep is run once (or ``--source`` names an existing sweep), and
its records are copied with their identity varied (model, variant and engine parameters, batch size), the point
key recomputed with ``harness.records.point_key``, and their timings scaled consistently (samples, summaries and
throughput). A second build adds the optional sections later stages write (a 2,000-sample monitor timeline,
roofline, profile) to every point, to bound the size when a sweep carries all of them. Targets on a 2-core CPU:
`harness report` under 10 s and the file under 15 MB.

    python benchmarks/report_scale.py [--points 500] [--source SWEEP_DIR]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.progress import write_sweep_meta
from harness.records import RECORD_NAME, point_key, write_record

TIME_STATS = ("median", "mean", "std", "min", "max", "iqr", "ci_low", "ci_high", "p50", "p90", "p95", "p99")
MODELS = {"tiny": 1.0, "small": 3.1, "medium": 7.9, "llama-3.2-1b": 21.0, "llama-3-8b": 96.0}
# variant -> (engine, params, speed factor vs eager, caveat when timings are not representative)
VARIANTS: dict[str, tuple[str, dict[str, Any], float, str | None]] = {
    "eager": ("eager", {}, 1.0, None),
    "compiled": ("compiled", {}, 1.4, None),
    "quantized(scheme=int8_dynamic)": ("quantized", {"scheme": "int8_dynamic"}, 1.8, None),
    "quantized(scheme=int4_weight_only)": ("quantized", {"scheme": "int4_weight_only"}, 2.3, None),
    "pruned(method=wanda, sparsity=0.5)": ("pruned", {"method": "wanda", "sparsity": 0.5}, 1.3, None),
    "fused": ("fused", {}, 3.0, "Triton kernels run by the interpreter"),
}
SWEEP_ARGS = ["engine=eager", "model=tiny", "model.weights=random", "workload.batch_size=1,2", "measure=quick"]
SWEEP_ARGS += ["workload.prompt_len=16", "workload.gen_len=4"]


def real_sweep(root: Path) -> list[dict[str, Any]]:
    """Run a small real sweep and return its ok records."""
    cmd = [sys.executable, "-m", "harness", "run", "-m", *SWEEP_ARGS, f"hydra.sweep.dir={root}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return read_records(root)


def read_records(root: Path) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(root.rglob(RECORD_NAME))]
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise SystemExit(f"{root}: no ok records to copy")
    return ok


def vary(base: dict[str, Any], model: str, variant: str, batch: int) -> dict[str, Any]:
    """A copy of a real record measuring another point: identity changed, timings scaled consistently."""
    rec = copy.deepcopy(base)
    engine, params, speed, caveat = VARIANTS[variant]
    ident = rec["identity"]
    b0 = ident["batch_size"]
    ident.update(model=model, variant=variant, engine=engine, engine_params=params, batch_size=batch)
    rec["point_key"] = point_key(ident)
    rec["config"]["engine"] = {"name": engine, **params}
    scale = MODELS[model] * (1 + 0.15 * (batch / b0 - 1)) / speed
    rec["samples"] = {k: [v * scale for v in vs] for k, vs in rec["samples"].items()}
    for stats in rec["summary"].values():
        for key in TIME_STATS:
            if stats.get(key) is not None:
                stats[key] *= scale
    s, m, w = rec["summary"], rec["metrics"], ident
    m["decode_tokens_per_s"] = batch * 1000 / s["tpot_ms"]["p50"]
    m["prefill_tokens_per_s"] = batch * w["prompt_len"] * 1000 / s["ttft_ms"]["p50"]
    m["output_tokens_per_s"] = batch * w["gen_len"] * 1000 / s["e2e_ms"]["p50"]
    m["peak_memory_mb"] = m["peak_memory_mb"] * MODELS[model] ** 0.5 + 4 * batch
    rec["timing"].update(representative=caveat is None, caveat=caveat)
    return rec


def add_sections(rec: dict[str, Any], samples: int = 2000) -> None:
    """The optional sections at full size (for the size bound): the record's own monitor timeline stretched to
    ``samples`` samples per series (every series it has), its own roofline, and a profile breakdown; a section the
    record lacks is built in the schema's shape from the record's own numbers."""
    tpot_s = rec["summary"]["tpot_ms"]["p50"] / 1000
    ttft_s = rec["summary"]["ttft_ms"]["p50"] / 1000
    monitor = rec.get("monitor") or {
        "backend": "psutil", "interval_s": 0.05,
        "timeline": {"t_s": [0.0], "cpu_util_process": [150.0], "cpu_util_system": [100.0],
                     "rss_mb": [rec["metrics"]["peak_memory_mb"]]},
        "labels": {"cpu_util_process": "process CPU %", "cpu_util_system": "system CPU %", "rss_mb": "RSS (MB)"},
    }  # fmt: skip
    timeline = monitor["timeline"]
    step = monitor.get("interval_s") or 0.05
    for name, values in list(timeline.items()):
        values = values or [0.0]
        timeline[name] = ([i * step for i in range(samples)] if name == "t_s"
                          else [values[i % len(values)] for i in range(samples)])  # fmt: skip
    rec["monitor"] = monitor
    if not rec.get("roofline"):
        weight_bytes, n_params = rec["metrics"]["weight_bytes"], rec["identity"]["n_params"]
        rows, prompt = rec["identity"]["batch_size"], rec["identity"]["prompt_len"]
        flops, pre_flops = 2 * n_params * rows, 2 * n_params * rows * prompt
        rec["roofline"] = {
            "peaks": {"bandwidth_gbs": 20.0, "flops": 4e11, "source": "measured", "bandwidth_source": "measured",
                      "flops_source": "measured", "device": "cpu", "dtype": "float32", "cache": None},
            "decode": {"bytes_per_step": weight_bytes, "flops_per_step": flops, "rows": rows,
                       "mean_context": prompt + (rec["identity"]["gen_len"] - 2) / 2,
                       "intensity": flops / weight_bytes, "achieved_gbs": weight_bytes / tpot_s / 1e9,
                       "achieved_gflops": flops / tpot_s / 1e9, "mbu": weight_bytes / tpot_s / 1e9 / 20.0},
            "prefill": {"bytes": weight_bytes, "flops": pre_flops, "intensity": pre_flops / weight_bytes,
                        "achieved_gbs": weight_bytes / ttft_s / 1e9, "achieved_gflops": pre_flops / ttft_s / 1e9,
                        "mfu": pre_flops / ttft_s / 4e11},
        }  # fmt: skip
    if not rec.get("profile"):
        shares = {"matmul": 0.6, "attention": 0.15, "norm": 0.05, "elementwise": 0.1, "copy": 0.05, "other": 0.05}
        rec["profile"] = {"breakdown_ms": {k: v * tpot_s * 1000 for k, v in shares.items()}, "total_ms": tpot_s * 1000}


def make_points(bases: list[dict[str, Any]], root: Path, n: int, sections: bool) -> None:
    batches = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384]
    grid = itertools.islice(itertools.product(MODELS, VARIANTS, batches), n)
    for i, (model, variant, batch) in enumerate(grid):
        rec = vary(bases[i % len(bases)], model, variant, batch)
        if sections:
            add_sections(rec)
        rec.pop("schema_version", None)
        rec["sweep"] = {**rec.get("sweep", {}), "dir": str(root), "job": i}
        write_record(root / str(i), rec)
    write_sweep_meta(root, {"command": ["benchmarks/report_scale.py", f"--points={n}"], "started_at": "benchmark"})


def build(root: Path) -> tuple[float, float, float]:
    """(CLI wall seconds, in-process write_report seconds, size MB) for the report of ``root``."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness", "report", str(root)], check=True, capture_output=True)
    cli_s = time.perf_counter() - t0
    from harness.report import write_report

    t0 = time.perf_counter()
    out = write_report(root)
    return cli_s, time.perf_counter() - t0, out.stat().st_size / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=500, help="points in the report (default 500)")
    ap.add_argument("--source", type=Path, help="sweep directory whose records are copied (default: run one)")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        tmp = Path(tmp)
        bases = read_records(opts.source) if opts.source else real_sweep(tmp / "source")
        print(f"{len(bases)} real record(s) copied into {opts.points} points")
        worst = 0.0, 0.0
        for label, sections in (("records as measured", False), ("+ monitor/roofline/profile sections", True)):
            root = tmp / ("sections" if sections else "plain")
            make_points(bases, root, opts.points, sections)
            cli_s, build_s, size_mb = build(root)
            worst = max(worst[0], cli_s), max(worst[1], size_mb)
            print(
                f"{label:<38} harness report: {cli_s:5.2f} s (write_report in-process {build_s:5.2f} s), "
                f"{size_mb:5.2f} MB"
            )
        ok_time, ok_size = worst[0] < 10, worst[1] < 15
        print(f"target < 10 s: {'met' if ok_time else 'NOT met'} ({worst[0]:.2f} s worst)")
        print(f"target < 15 MB: {'met' if ok_size else 'NOT met'} ({worst[1]:.2f} MB largest)")


if __name__ == "__main__":
    main()
