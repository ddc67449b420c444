"""Test-only engines that misbehave on purpose, for the fault-isolation and resume tests.

Importable by other processes (launchers' workers, isolated points) with
``HARNESS_ENGINES=fault_engines PYTHONPATH=tests``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.base import Engine, choice, register


@dataclass(frozen=True)
class FaultParams:
    fault: str = choice("none", ("none", "raise", "oom", "hang", "kill"))
    counter: str = ""  # a file that gets one line per prepare: counts the runs across processes
    on_run: int = 0  # fire only on this run number in `counter` (0: on every run)


@register
class FaultEngine(Engine):
    """Raises, exhausts memory, hangs, or kills its own process in prepare(), as told."""

    name = "fault-test"
    Params = FaultParams

    def prepare(self, model, ctx):
        p = self.params
        run = 0
        if p.counter:
            with open(p.counter, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            run = len(Path(p.counter).read_text().splitlines())
        if p.on_run and run != p.on_run:
            return model
        if p.fault == "raise":
            raise RuntimeError("injected failure")
        if p.fault == "oom":
            # 4 EiB, past x86-64's 128 TiB of user address space: refused under every vm.overcommit_memory setting
            # (64 TiB would be mapped lazily, and the point come out ok, with overcommit_memory=1)
            torch.empty(1 << 62, dtype=torch.uint8)
        if p.fault == "hang":
            while True:
                time.sleep(0.05)
        if p.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return model
