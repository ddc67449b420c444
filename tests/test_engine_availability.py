"""Engines' availability on CUDA, checked without a GPU: what would make a point fail mid-run (a missing host C
compiler for Triton's launchers, bf16 Triton matmuls before sm_80, 2:4 kernels missing for an architecture) is
a reason, so the point is skipped. The device queries are replaced by the answers a given GPU would give."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.utils._triton as torch_triton

from engines import kernels, sparse_formats
from engines.base import make_engine

CUDA = torch.device("cuda")


def test_triton_on_cuda_needs_a_host_c_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = kernels.unavailable(CUDA)
    assert reason and "host C compiler" in reason and "cc, gcc or clang" in reason
    assert make_engine({"name": "fused"}).available(CUDA, torch.float16) == reason
    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    assert make_engine({"name": "compiled"}).available(CUDA) == reason  # inductor's kernels are Triton's too
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang" else None)
    assert kernels.unavailable(CUDA) is None and make_engine({"name": "compiled"}).available(CUDA) is None
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/cc/bin/mycc" if name == "mycc" else None)
    monkeypatch.setenv("CC", "mycc")
    assert kernels.unavailable(CUDA) is None


@pytest.mark.parametrize("cap,dtype,ok", [((7, 5), torch.bfloat16, False), ((7, 5), torch.float16, True),
                                          ((8, 0), torch.bfloat16, True), ((9, 0), torch.bfloat16, True)])  # fmt: skip
def test_bf16_triton_kernels_need_sm80(monkeypatch, cap, dtype, ok):
    monkeypatch.setenv(kernels.INTERPRET_ENV, "0")  # compiled for the GPU, as on a CUDA machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = kernels.dtype_unavailable(dtype, CUDA)
    assert (reason is None) == ok
    if not ok:
        assert reason == ("dtype=bf16: the Triton kernels' bf16 matmuls need compute capability 8.0+ (this device: "
                          "Tesla T4, 7.5); use dtype=fp16")  # fmt: skip
        with pytest.raises(ValueError, match="compute capability 8.0"):
            kernels.check_dtype(dtype, CUDA)


def test_the_interpreters_dtype_reason_names_the_config_value(monkeypatch):
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    assert "(got bf16)" in kernels.dtype_unavailable(torch.bfloat16)


def test_two_four_availability_is_probed_once_per_device_and_dtype(monkeypatch):
    """sm >= 8.0 is not enough (CUTLASS's 2:4 kernels are sm_8x only): one small compressed matmul is tried, its
    failure is the reason, and the outcome is cached."""
    calls = []

    def compress(w):
        calls.append((w.shape, w.dtype))
        if w.dtype == torch.float64:
            raise RuntimeError("_sparse_semi_structured_linear: CUTLASS kernels are built for sm_8x only")
        assert (w.view(-1, 4)[:, 2:] == 0).all() and (w.view(-1, 4)[:, :2] != 0).all()  # a real 2:4 weight
        return w

    monkeypatch.setattr(sparse_formats, "to_semi_structured", compress)
    sparse_formats.probe_semi_structured.cache_clear()
    try:
        assert sparse_formats.probe_semi_structured("cpu", torch.float32) is None
        for _ in range(2):
            reason = sparse_formats.probe_semi_structured("cpu", torch.float64)
            assert "cannot run on cpu in fp64" in reason and "RuntimeError" in reason and "sm_8x only" in reason
            assert "engine.format=dense" in reason
        assert calls == [((128, 128), torch.float32), ((128, 128), torch.float64)]  # once each
    finally:
        sparse_formats.probe_semi_structured.cache_clear()


def test_two_four_on_a_new_gpu_asks_the_probe(monkeypatch):
    probed = []
    monkeypatch.setattr(sparse_formats, "probe_semi_structured", lambda dev, dt: probed.append((dev, dt)) or "no")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert sparse_formats.semi_structured_unavailable(CUDA, torch.bfloat16) == "no"
    assert sparse_formats.semi_structured_unavailable(CUDA) == "no"
    assert probed == [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    assert make_engine({"name": "pruned", "method": "2:4"}).available(CUDA, torch.bfloat16) == "no"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert "compute capability 8.0+ (this device: Tesla T4, 7.5)" in sparse_formats.semi_structured_unavailable(CUDA)
    assert len(probed) == 3  # before sm_80 nothing is probed
