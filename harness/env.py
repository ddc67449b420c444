"""Environment fingerprint: what hardware and software produced a measurement.

The fingerprint ``id`` hashes only what changes performance (device, CPU model and its identity beyond the model
name: family, model, stepping, the vector/matrix ISA extensions, cache sizes and the kernels torch dispatches to;
thread count, whether weights sit on huge pages, driver and the numeric stack's versions), so two sweeps on the same
machine and stack share it and the gate can tell comparable runs from incomparable ones; hostname, time, git SHA and
the CPU clock (it varies from reading to reading) are recorded beside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil
import torch

CPUINFO = Path("/proc/cpuinfo")
CPU_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")  # where lscpu reads cache sizes
# ISA extensions that decide which kernels run (x86 `flags`, Arm `Features`): a VM's generic model name hides them
CPU_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "asimdhp", "asimddp", "sve", "sve2",
    "bf16", "i8mm", "sme",
)  # fmt: skip
# /proc/cpuinfo fields that name the core (x86; Arm) beyond its marketing name
CPU_ID_FIELDS = {
    "vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping",
    "CPU implementer": "implementer", "CPU architecture": "architecture", "CPU variant": "variant",
    "CPU part": "part", "CPU revision": "revision",
}  # fmt: skip
THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PACKAGES = ("torch", "triton", "numpy", "hydra-core", "omegaconf", "pandas", "scipy", "torchao", "nvidia-ml-py")
PROJECT = "llm-inference-harness"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (PROJECT, *PACKAGES):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _first_processor(cpuinfo: Path) -> dict[str, str]:
    """The fields of the first processor block of ``cpuinfo`` (empty where the file is missing or unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields.get("processor") is not None and len(fields) > 1:
                break  # the first block is complete (Arm lists shared fields after the blocks: keep reading there)
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _size_kb(text: str) -> int | None:
    """``48K``, ``2048K``, ``32M``, ``307200 KB`` as KiB; None when unreadable."""
    text = text.strip().upper().removesuffix("B").strip()
    scale = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        return int(float(number) * (scale or 1 / 1024))
    except ValueError:
        return None


def _cache_kb(cache_dir: Path, cpuinfo_size: str | None) -> dict[str, int]:
    """Cache sizes of the first core in KiB (``l1d``, ``l1i``, ``l2``, ``l3``), from sysfs as lscpu reads them;
    without sysfs, /proc/cpuinfo's ``cache size`` (the last level on Intel, L2 on AMD: kept under its own name)."""
    out: dict[str, int] = {}
    try:
        indexes = sorted(cache_dir.glob("index*"))
    except OSError:
        indexes = []
    for index in indexes:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _size_kb((index / "size").read_text())
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        if size is not None:
            out[f"l{level}{suffix}"] = size
    if not out and cpuinfo_size:
        size = _size_kb(cpuinfo_size)
        if size is not None:
            out["cpuinfo_cache_size"] = size
    return out


@functools.cache
def cpu_info(cpuinfo: Path = CPUINFO, cache_dir: Path = CPU_CACHE_SYSFS) -> dict[str, Any]:
    """What tells two CPUs with one model name apart (``Intel(R) Xeon(R) Processor`` on most VMs): vendor, family,
    model and stepping (Arm: implementer, part, variant, revision), the speed-relevant ISA extensions it reports,
    its cache sizes, and the kernel level torch dispatches to. Fields that cannot be read are left out."""
    fields = _first_processor(cpuinfo)
    info: dict[str, Any] = {name: fields[key] for key, name in CPU_ID_FIELDS.items() if key in fields}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["isa"] = [f for f in CPU_FLAGS if f in flags]
    info["cache_kb"] = _cache_kb(cache_dir, fields.get("cache size"))
    try:
        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    return info


def cpu_freq_mhz() -> dict[str, float | None] | None:
    """The CPU clock as psutil reads it (current, min, max; 0 becomes None, as VMs report), None where unreadable.
    Recorded, never hashed into the id: it changes from one reading to the next."""
    try:
        freq = psutil.cpu_freq()
    except (OSError, RuntimeError, NotImplementedError, AttributeError):
        return None
    if freq is None:
        return None
    return {k: (float(v) if v else None) for k, v in (("current", freq.current), ("min", freq.min), ("max", freq.max))}


def enable_huge_pages() -> None:
    """Ask PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``) unless the user chose.

    Decode at small batch streams every weight once per token, so its speed depends on TLB reach. With 4 KiB
    pages the speed of a model also depended on how its tensors happened to be allocated: on a 2-core EPYC VM a
    copy of the reference weights decoded `medium` 6-8% slower than the reference itself, which read as a
    slowdown of any engine that copies weights (pruned, quantized). With huge pages both ran at the same speed
    and faster. PyTorch reads the variable once, at its first allocation of 2 MiB or more, so this must run
    before any model is built; set ``THP_MEM_ALLOC_ENABLE=0`` to measure without.
    """
    os.environ.setdefault(THP_ENV, "1")


@functools.cache
def huge_pages() -> dict[str, Any]:
    """Whether large tensors of this process land on huge pages, measured: a 16 MiB tensor is allocated and
    touched, and the process's AnonHugePages must grow (the kernel may refuse, e.g. THP ``never``)."""
    mode = None
    try:
        text = THP_SYSFS.read_text()
        mode = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        pass

    def anon_huge_kb() -> int | None:
        try:
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    before = anon_huge_kb()
    probe = torch.ones(4 << 20, dtype=torch.float32)
    after = anon_huge_kb()
    del probe
    used = None if before is None or after is None else after - before >= 2048
    return {"system": mode, "torch_alloc": os.environ.get(THP_ENV), "in_use": used}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_state(path: Path | None = None) -> dict[str, Any]:
    """SHA and dirtiness of the project being measured: the git checkout of ``path`` (default: cwd), else the
    checkout the harness itself runs from."""
    for where in (path or Path.cwd(), Path(__file__).resolve().parent):
        sha = _git(["rev-parse", "HEAD"], where)
        if sha:
            status = _git(["status", "--porcelain", "--untracked-files=no"], where)
            root = _git(["rev-parse", "--show-toplevel"], where)
            return {"sha": sha, "dirty": bool(status), "repo": root}
    return {"sha": None, "dirty": None, "repo": None}


def nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of the GPU torch calls ``device``. NVML numbers every GPU of the machine and ignores
    ``CUDA_VISIBLE_DEVICES``, so torch's index would name another GPU (another job's) under a mask: the device
    is looked up by its UUID, then by torch's own translation of the mask, and by index only where neither works
    (no mask: the numbering agrees)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:
        pass
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(index))
    except Exception:
        if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
            raise RuntimeError(f"cannot tell which NVML device is cuda:{index} under CUDA_VISIBLE_DEVICES") from None
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def cuda_info(device: torch.device) -> dict[str, Any]:
    """Device name, capability, memory, driver and clocks (clocks through NVML when it is installed)."""
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gb": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device)
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        info["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["mem_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        info["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
    except Exception as exc:  # NVML is optional; say why clocks are missing
        info["nvml"] = f"unavailable: {exc.__class__.__name__}: {exc}"
    return info


def fingerprint(device: torch.device) -> dict[str, Any]:
    """The environment record of a point."""
    versions = package_versions()
    fp: dict[str, Any] = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu": cpu_info(),
        "cpu_freq_mhz": cpu_freq_mhz(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "huge_pages": huge_pages() if device.type == "cpu" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "versions": versions,
        "torch_config": {"cuda": torch.version.cuda, "debug": torch.version.debug},
        "git": git_state(),
    }
    if device.type == "cuda":
        fp["cuda"] = cuda_info(device)
    fp["id"] = fingerprint_id(fp)
    return fp


def fingerprint_id(fp: dict[str, Any]) -> str:
    """Hash of what makes timings comparable (not hostname, time, git SHA or the CPU clock)."""
    v = fp.get("versions", {})
    key = {
        "device": [fp.get("device_type"), fp.get("device_name")],
        "cpu": [fp.get("cpu_model"), fp.get("cpu_affinity"), fp.get("torch_threads")],
        "stack": [v.get("torch"), v.get("triton"), v.get("torchao"), fp.get("torch_config", {}).get("cuda")],
        "driver": fp.get("cuda", {}).get("driver"),
    }
    if fp.get("cpu"):  # family, model, stepping, ISA, caches: absent from records before it, whose ids hold
        key["cpu_id"] = fp["cpu"]
    if (fp.get("huge_pages") or {}).get("in_use"):  # only when on: ids of records from before this field hold
        key["huge_pages"] = True
    cuda = fp.get("cuda") or {}
    # a GPU capped at half its power, or with its clocks locked lower, is another machine for every timing
    limits = {k: cuda[k] for k in ("power_limit_w", "max_sm_clock_mhz") if cuda.get(k) is not None}
    if limits:
        key["gpu_limits"] = limits
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
