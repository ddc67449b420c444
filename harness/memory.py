"""Peak memory over a window: allocator peak on CUDA, process peak RSS (VmHWM) on CPU.

On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so a window's CPU peak is
measured like ``torch.cuda.max_memory_allocated`` after a reset. Where that file is not writable, the peak is
the process's lifetime peak and the record says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """``reset()`` at the start of a window, ``read()`` at its end -> (peak MiB, how it was measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "unavailable"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "VmHWM (peak RSS, reset at window start)"
        except OSError:
            self.method = "VmHWM (peak RSS of the whole process: clear_refs not writable)"
        if _vm_hwm_bytes() is None:
            self.method = "psutil RSS at window end (no VmHWM on this OS)"

    def read(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, self.method
        peak = _vm_hwm_bytes()
        if peak is None:
            peak = psutil.Process().memory_info().rss
        return peak / 2**20, self.method


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20
