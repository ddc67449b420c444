"""A point's deadline (measure.timeout_s) never leaves a module half-imported for the points after it."""

from __future__ import annotations

import sys
import time

import pytest

from harness.isolation import PointTimeout, deadline


def test_a_deadline_inside_an_import_waits_for_the_import_then_fires(tmp_path, monkeypatch):
    pkg = tmp_path / "slowpkg_deadline"
    pkg.mkdir()
    (pkg / "done.py").write_text("VALUE = 1\n")
    (pkg / "__init__.py").write_text("import time\nfrom . import done\ntime.sleep(0.4)\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(PointTimeout, match="measure.timeout_s=0.1"):
        with deadline(0.1):
            import slowpkg_deadline  # noqa: F401
            time.sleep(5.0)  # the deadline still ends the point, right after the import
    assert time.monotonic() - t0 < 2.0
    module = sys.modules["slowpkg_deadline"]
    assert module.COMPLETE is True and module.done.VALUE == 1  # whole, with its submodule bound
    for name in ("slowpkg_deadline", "slowpkg_deadline.done"):
        sys.modules.pop(name, None)
