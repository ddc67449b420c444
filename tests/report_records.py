"""Synthetic sweeps for the report tests: records written with ``harness.records.write_record`` that follow
docs/record-schema.md exactly, including the sections later stages add (quality, monitor, roofline, profile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.progress import write_sweep_meta
from harness.records import point_key, write_record
from harness.stats import summarize

EVIL = "<script>window.__pwned=1</script>"
PEAK_GBS, PEAK_FLOPS = 200.0, 5e12
# variant -> (engine, params, TPOT divisor vs eager, top-1 agreement, KL, perplexity, caveat)
VARIANTS: dict[str, tuple[str, dict[str, Any], float, float, float, float, str | None]] = {
    "eager": ("eager", {}, 1.0, 1.0, 0.0, 12.0, None),
    "quantized(scheme=int8)": ("quantized", {"scheme": "int8"}, 2.0, 0.97, 0.02, 12.5, None),
    "pruned(sparsity=0.5)": ("pruned", {"sparsity": 0.5}, 1.25, 0.90, 0.2, 14.0, None),
    "fused": ("fused", {}, 10.0, 0.999, 0.001, 12.01, "Triton kernels run by the interpreter"),
}
MODELS = {"tiny": (3_016_960, 2.0), "small": (100_000_000, 8.0)}  # n_params, eager TPOT ms at batch 1
BATCHES = (1, 4)
TIMELINE_LEN = 1000  # longer than the report draws: exercises the striding


def _identity(engine: str, variant: str, params: dict[str, Any], model: str, batch: int) -> dict[str, Any]:
    return {
        "engine": engine,
        "variant": variant,
        "engine_params": params,
        "model": model,
        "weights": "random",
        "model_args": {"dim": 64},
        "n_params": MODELS[model][0],
        "batch_size": batch,
        "prompt_len": 16,
        "gen_len": 4,
        "decoding": "greedy",
        "num_beams": 1,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
    }


def make_record(
    variant: str, model: str, batch: int, seed: int, sections: bool = True, status: str = "ok", error: str | None = None
) -> dict[str, Any]:
    """One point of the synthetic sweep; ``sections=False`` leaves out what later stages add."""
    engine, params, divisor, top1, kl, ppl, caveat = VARIANTS.get(variant, (variant, {}, 1.0, 1.0, 0.0, 12.0, None))
    ident = _identity(engine, variant, params, model, batch)
    record: dict[str, Any] = {
        "status": status,
        "error": error,
        "point_key": point_key(ident),
        "identity": ident,
        "config": {"engine": {"name": engine, **params}, "workload": {"batch_size": batch}, "note": EVIL},
        "env": {
            "device_type": "cpu",
            "device_name": "Test CPU",
            "cpu_model": "Test CPU",
            "python": "3.11.7",
            "hostname": "test",
            "versions": {"torch": "2.13.0+cpu"},
            "git": {"sha": "0123456789abcdef", "dirty": False, "repo": "/src"},
            "id": "abc123",
        },
        "sweep": {"dir": None, "job": seed, "overrides": [f"model={model}"], "mode": "multirun"},
        "started_at": "2026-11-23T12:00:00+00:00",
        "duration_s": 1.0,
    }
    if status != "ok":
        record["traceback"] = "Traceback (most recent call last):\n..."
        return record
    rng = np.random.default_rng(seed)
    tpot = MODELS[model][1] * (1 + 0.5 * (batch - 1) / 3) / divisor
    ttft = 4 * tpot
    reps = 15
    samples = {
        "ttft_ms": list(ttft * rng.uniform(0.97, 1.03, reps)),
        "tpot_ms": list(tpot * rng.uniform(0.97, 1.03, reps)),
        "itl_ms": list(tpot * rng.uniform(0.95, 1.05, reps * 3)),
    }
    samples["e2e_ms"] = [a + 3 * b for a, b in zip(samples["ttft_ms"], samples["tpot_ms"], strict=True)]
    summary = {k: summarize(v) for k, v in samples.items()}
    p50 = summary["tpot_ms"]["p50"]
    record.update(
        timing={"clock": "perf_counter_ns", "reps": reps, "converged": True, "stop_reason": "converged"}
        | {"representative": caveat is None, "caveat": caveat},
        samples=samples,
        summary=summary,
        metrics={
            "decode_tokens_per_s": batch * 1000 / p50,
            "prefill_tokens_per_s": batch * 16 * 1000 / summary["ttft_ms"]["p50"],
            "output_tokens_per_s": batch * 4 * 1000 / summary["e2e_ms"]["p50"],
            "peak_memory_mb": 100.0 + 10 * batch + (50 if engine == "eager" else 20),
            "weight_bytes": MODELS[model][0] * 4 // int(divisor if engine == "quantized" else 1),
        },
    )
    if sections:
        _add_sections(record, seed, top1, kl, ppl, p50)
    return record


def _add_sections(record: dict[str, Any], seed: int, top1: float, kl: float, ppl: float, tpot_ms: float) -> None:
    ident, metrics = record["identity"], record["metrics"]
    record["quality"] = {
        "reference": "eager",
        "n_tokens": 4096,
        "top1_agreement": top1,
        "kl": kl,
        "ppl": ppl,
        "bits_per_byte": 1.2,
        "greedy_agreement_len": 3.5,
        "trained": True,
        "corpus": {"name": "test", "files": 1, "bytes": 1000, "sha256": "0" * 64},
    }
    t = np.arange(TIMELINE_LEN) * 0.01
    rng = np.random.default_rng(seed + 1000)
    record["monitor"] = {
        "backend": "psutil",
        "interval_s": 0.01,
        "timeline": {
            "t_s": list(t),
            "cpu_util_process": list(150 + 40 * rng.standard_normal(TIMELINE_LEN)),
            "rss_mb": list(metrics["peak_memory_mb"] - 5 + rng.uniform(0, 5, TIMELINE_LEN)),
        },
        "labels": {"cpu_util_process": "process CPU % (all cores)", "rss_mb": "resident memory (MB)"},
        "aggregates": {"cpu_util_process": {"mean": 150.0, "max": 250.0}},
        "energy_j": None,
        "energy_source": None,
        "missing": {"power": "no NVML on this machine"},
    }
    bytes_per_token = metrics["weight_bytes"]
    flops_per_token = 2 * ident["n_params"] * ident["batch_size"]
    seconds = tpot_ms / 1000
    achieved_gbs = bytes_per_token / seconds / 1e9
    record["roofline"] = {
        "peaks": {"bandwidth_gbs": PEAK_GBS, "flops": PEAK_FLOPS, "source": "measured", "device": "Test CPU"},
        "decode": {
            "bytes_per_step": bytes_per_token,
            "flops_per_step": flops_per_token,
            "intensity": flops_per_token / bytes_per_token,
            "achieved_gbs": achieved_gbs,
            "achieved_gflops": flops_per_token / seconds / 1e9,
            "mbu": achieved_gbs / PEAK_GBS,
        },
        "prefill": {
            "bytes": bytes_per_token,
            "flops": 16 * flops_per_token,
            "intensity": 16 * flops_per_token / bytes_per_token,
            "achieved_gflops": 16 * flops_per_token / (record["summary"]["ttft_ms"]["p50"] / 1000) / 1e9,
            "mfu": 0.1,
        },
    }
    breakdown = {"matmul": 0.6, "attention": 0.15, "norm": 0.05, "elementwise": 0.1, "copy": 0.05, "other": 0.05}
    record["profile"] = {
        "trace": "trace.json",
        "breakdown_ms": {k: v * tpot_ms for k, v in breakdown.items()},
        "total_ms": tpot_ms,
    }
    metrics["mbu"] = record["roofline"]["decode"]["mbu"]
    metrics["util_mean"] = 150.0


def synthetic_sweep(root: Path, sections: bool = True) -> Path:
    """A sweep directory: every variant on every model and batch, one failed and one skipped point, and a
    ``<script>`` tag in a config value, a variant parameter and an error message."""
    job = 0
    for model in MODELS:
        for variant in VARIANTS:
            for batch in BATCHES:
                write_record(root / str(job), make_record(variant, model, batch, job, sections))
                job += 1
    failed = make_record(
        f"broken(tag={EVIL})", "tiny", 1, job, status="failed", error=f"RuntimeError: bad kernel {EVIL}"
    )
    write_record(root / str(job), failed)
    skipped = make_record("gpu-only", "tiny", 1, job + 1, status="skipped", error="needs CUDA sm_80+")
    write_record(root / str(job + 1), skipped)
    write_sweep_meta(root, {"command": ["harness", "run", "-m", f"+note={EVIL}"], "started_at": "2026-11-23T12:00"})
    return root
