"""Utilization and energy sampling around a timed window, in a background thread.

Host series come from psutil on every device: this process's CPU use (percent of the cores it may use),
the system's CPU use and the process's RSS. With a CUDA device and NVML (``nvidia-ml-py``, imported as
``pynvml``) the GPU series are added: ``gpu_util`` is NVML's utilization rate, which means "a kernel was running
during the sample period", not how busy the SMs were; ``sm_active`` (GPM, Hopper and newer drivers) is the
fraction of SM cycles with work, where the driver offers it. Energy is the difference of NVML's total-energy
counter over the window; on CPU, of the RAPL counter of package 0 where /sys/class/powercap is readable (the
whole package, every process on it, not this one alone; a counter that wraps around during the window gets
``max_energy_range_uj`` added back). Every figure that cannot be read is listed in ``missing`` with the reason,
never silently absent.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from harness.env import nvml_handle

GPM_MIN_SPAN_S = 0.1  # the shortest span between two GPM samples a metric is computed over
RAPL = Path("/sys/class/powercap/intel-rapl:0")  # package 0
RAPL_SOURCE = "rapl (package 0, whole system: every process on the package, not this point alone)"
LABELS = {
    "cpu_util_process": "process CPU (% of usable cores)",
    "cpu_util_system": "system CPU (%)",
    "rss_mb": "process RSS (MiB)",
    "gpu_util": "GPU util (% of time a kernel was running)",
    "mem_util": "GPU memory-controller util (%)",
    "mem_used_mb": "GPU memory used (MiB)",
    "power_w": "GPU power (W)",
    "sm_clock_mhz": "SM clock (MHz)",
    "mem_clock_mhz": "memory clock (MHz)",
    "temp_c": "GPU temperature (°C)",
    "throttle_reasons": "clock throttle reasons (NVML bitmask)",
    "sm_active": "SM active (% of cycles, GPM)",
}


# NVML's clocks-event (throttle) reason bits, nvml.h's nvmlClocksEventReason*
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
IDLE_BIT = 0x1


def throttle_summary(values: np.ndarray) -> dict[str, Any]:
    """The window's throttle reasons: a bitmask has no mean, so its union (``any``, with the reasons' names)
    and the fraction of samples with a reason other than idle, the ones that slow clocks under load."""
    masks = values.astype(np.int64)
    union = int(np.bitwise_or.reduce(masks)) if masks.size else 0
    return {
        "any": union,
        "reasons": [name for bit, name in THROTTLE_BITS.items() if union & bit],
        "fraction_throttled": float(np.mean((masks & ~IDLE_BIT) != 0)) if masks.size else 0.0,
    }


def _reason(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"


class _Nvml:
    """NVML readings of one GPU; each reading that fails once is dropped and its reason kept."""

    def __init__(self, device: torch.device) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = nvml_handle(pynvml, device)
        self.missing: dict[str, str] = {}
        self.gpm = self._gpm_setup()

    def _gpm_setup(self) -> Any:
        nv = self.nv
        try:
            if not nv.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice:
                self.missing["sm_active"] = "GPM not supported by this GPU or driver"
                return None
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.handle, sample)
            self.gpm_t = time.perf_counter()
            return sample
        except Exception as exc:
            self.missing["sm_active"] = f"GPM unavailable ({_reason(exc)})"
            return None

    def start(self) -> None:
        """The GPM baseline at the window's start: a value covers the window, not what ran before it."""
        if self.gpm is not None:
            try:
                self.nv.nvmlGpmSampleGet(self.handle, self.gpm)
                self.gpm_t = time.perf_counter()
            except Exception as exc:
                self.missing["sm_active"] = f"GPM: {_reason(exc)}"
                self.gpm = None

    def energy_mj(self) -> float | None:
        try:
            return float(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception as exc:
            self.missing.setdefault("energy", f"NVML total energy counter unavailable ({_reason(exc)})")
            return None

    def read(self) -> dict[str, float]:
        nv, h = self.nv, self.handle
        readers = {
            "gpu_util": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_util": lambda: nv.nvmlDeviceGetUtilizationRates(h).memory,
            "mem_used_mb": lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "temp_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "throttle_reasons": lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h),
        }
        out: dict[str, float] = {}
        for name, read in readers.items():
            if name in self.missing:
                continue
            try:
                out[name] = float(read())
            except Exception as exc:
                self.missing[name] = f"NVML: {_reason(exc)}"
        if self.gpm is not None:
            out.update(self._sm_active())
        return out

    def _sm_active(self) -> dict[str, float]:
        """SM activity between the stored GPM sample and now, once they are GPM_MIN_SPAN_S apart: closer samples
        give unreliable values (NVIDIA's tools sample GPM at 100 ms or more); until then the row has none."""
        nv = self.nv
        if time.perf_counter() - self.gpm_t < GPM_MIN_SPAN_S:
            return {}
        try:
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.handle, sample)
            now = time.perf_counter()
            metrics = nv.c_nvmlGpmMetricsGet_t()
            metrics.version = nv.NVML_GPM_METRICS_GET_VERSION
            metrics.numMetrics = 1
            metrics.sample1, metrics.sample2 = self.gpm, sample
            metrics.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            nv.nvmlGpmMetricsGet(metrics)
            nv.nvmlGpmSampleFree(self.gpm)
            self.gpm, self.gpm_t = sample, now
            status = metrics.metrics[0].nvmlReturn
            if status != nv.NVML_SUCCESS:  # the value is undefined then
                self.missing["sm_active"] = f"GPM SM_UTIL metric returned NVML error {status}"
                nv.nvmlGpmSampleFree(self.gpm)
                self.gpm = None
                return {}
            return {"sm_active": float(metrics.metrics[0].value)}
        except Exception as exc:
            self.missing["sm_active"] = f"GPM: {_reason(exc)}"
            self.gpm = None
            return {}


def _rapl_uj(rapl: Path, name: str = "energy_uj") -> float | None:
    """A counter of the powercap zone ``rapl`` in µJ: ``energy_uj``, or ``max_energy_range_uj`` (where it wraps)."""
    try:
        return float((rapl / name).read_text())
    except (OSError, ValueError):
        return None


class Sampler:
    """``with Sampler(device, interval_s) as s: ...`` then ``s.result(tokens)`` -> the record's monitor section."""

    def __init__(self, device: torch.device, interval_s: float = 0.05, rapl: Path = RAPL) -> None:
        self.device = device
        self._rapl = Path(rapl)
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self.missing: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else psutil.cpu_count()
        self._nvml: _Nvml | None = None
        self.backend = "psutil"
        if device.type == "cuda":
            try:
                self._nvml = _Nvml(device)
                self.backend = "nvml+psutil"
            except Exception as exc:
                self.missing["gpu"] = f"NVML unavailable: {_reason(exc)}"
        # RAPL counts the CPU package: a GPU point without NVML has no energy figure rather than the CPU's
        rapl_ok = device.type == "cpu" and _rapl_uj(self._rapl) is not None
        self._energy_source = "nvml_total_energy" if self._nvml else (RAPL_SOURCE if rapl_ok else None)
        if self._energy_source is None:
            why = "no NVML for this device" if device.type == "cuda" else f"RAPL not readable ({self._rapl} absent)"
            self.missing["energy"] = why
        self._sample_cpu_s = 0.0

    def _energy(self) -> float | None:
        """Joules since an arbitrary origin, from the chosen counter."""
        if self._energy_source == "nvml_total_energy":
            mj = self._nvml.energy_mj()
            return None if mj is None else mj / 1e3
        if self._energy_source == RAPL_SOURCE:
            uj = _rapl_uj(self._rapl)
            return None if uj is None else uj / 1e6
        return None

    def _energy_delta(self, e0: float | None, e1: float | None) -> float | None:
        """Joules between two readings; RAPL's counter wraps to 0 after ``max_energy_range_uj``."""
        if e0 is None or e1 is None:
            return None
        if e1 >= e0 or self._energy_source != RAPL_SOURCE:
            return e1 - e0
        range_uj = _rapl_uj(self._rapl, "max_energy_range_uj")
        if not range_uj:
            self.missing["energy"] = f"RAPL counter wrapped and {self._rapl / 'max_energy_range_uj'} is not readable"
            return None
        return e1 + range_uj / 1e6 - e0  # one wrap: a full range takes tens of minutes at least

    def _sample(self, t0: float) -> None:
        c0 = time.thread_time()
        row = {
            "t_s": time.perf_counter() - t0,
            "cpu_util_process": self._proc.cpu_percent(None) / self._cores,
            "cpu_util_system": psutil.cpu_percent(None),
            "rss_mb": self._proc.memory_info().rss / 2**20,
        }
        if self._nvml is not None:
            row.update(self._nvml.read())
        self.samples.append(row)
        self._sample_cpu_s += time.thread_time() - c0

    def _run(self, t0: float) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample(t0)
            self._sample(t0)  # the window's end: even a window shorter than the interval has a sample
        except Exception as exc:  # a thread that dies says so: the timeline ends there, and `missing` says why
            self.missing["sampler"] = f"the sampler stopped at {time.perf_counter() - t0:.2f} s: {_reason(exc)}"

    def __enter__(self) -> Sampler:
        self._proc.cpu_percent(None)  # prime the counters: the first call has no interval to measure
        psutil.cpu_percent(None)
        if self._nvml is not None:
            self._nvml.start()
        self._e0 = self._energy()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(self._t0,), name="harness-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.window_s = time.perf_counter() - self._t0
        self.energy_j = self._energy_delta(self._e0, self._energy())

    def _util_source(self, aggregates: dict[str, Any]) -> str | None:
        """The series the table's ``util_mean`` reads: NVML's on a GPU, the process's CPU use on a CPU. A CUDA
        point whose NVML could not be read has none: host CPU use is not GPU utilization."""
        if self.device.type == "cuda":
            return "gpu_util" if "gpu_util" in aggregates else None
        return "cpu_util_process" if "cpu_util_process" in aggregates else None

    def result(self, tokens: int) -> dict[str, Any]:
        """The monitor section: timeline, per-series mean/max, energy (J and J/token), missing figures, overhead."""
        names = sorted({k for s in self.samples for k in s} - {"t_s"})
        timeline: dict[str, list[float | None]] = {"t_s": [s["t_s"] for s in self.samples]}
        aggregates = {}
        for name in names:
            values = [s.get(name) for s in self.samples]
            timeline[name] = values
            v = np.array([x for x in values if x is not None], dtype=float)
            if v.size:
                aggregates[name] = throttle_summary(v) if name == "throttle_reasons" else {
                    "mean": float(v.mean()), "max": float(v.max())
                }  # fmt: skip
        missing = {**self.missing, **(self._nvml.missing if self._nvml else {})}
        energy = self.energy_j
        return {
            "backend": self.backend,
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "n_samples": len(self.samples),
            "timeline": timeline,
            "labels": {k: LABELS.get(k, k) for k in names},
            "aggregates": aggregates,
            "util_source": self._util_source(aggregates),
            "energy_j": energy,
            "energy_source": self._energy_source if energy is not None else None,
            "tokens": tokens,
            "energy_j_per_token": energy / tokens if energy is not None and tokens else None,
            "missing": missing,
            "overhead": {
                "sampler_cpu_s": self._sample_cpu_s,
                "per_sample_us": 1e6 * self._sample_cpu_s / max(len(self.samples), 1),
                "fraction_of_window": self._sample_cpu_s / self.window_s if self.window_s else None,
            },
        }
