"""Calibration of the gate on real measurements of this machine (benchmarks/gate_calibration.py): two
independent measurements of the same code (A/A, 48 points) must be flagged as regressions at most 1% of the
time, and a real 10% slowdown (the `slowed-test` engine adds 10% measured work to every forward) at least 95%.
The rates are printed. Slow (144 measured points): `pytest -m slow -s tests/test_gate_calibration.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gate_calibration import calibrate, details, noise_floor  # noqa: E402


@pytest.mark.slow
def test_gate_calibration_aa_and_injected_slowdown(run_harness, tmp_path, capsys):
    cal = calibrate(lambda args: run_harness(*args), tmp_path)
    capsys.readouterr()  # the sweeps' own output
    with capsys.disabled():
        print(f"\n{cal.summary()}\n{noise_floor(cal)}\n{details(cal)}")
    assert cal.rate(cal.aa) <= 0.01
    assert cal.rate(cal.slow) >= 0.95
    assert 1.06 < np.median(cal.tpot_ratio) < 1.16  # the injected slowdown is what the harness measures
