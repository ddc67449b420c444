"""Utilization sampling, NVML absence, and the profiler breakdown, on real runs."""

from __future__ import annotations

import json
import time
import types

import numpy as np
import pytest
import torch
from conftest import FAST_POINT

from harness.monitor import Sampler
from harness.profiling import CATEGORIES, categorize
from harness.records import RECORD_NAME, load

QUICK = FAST_POINT


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_sampler_timeline_aggregates_and_overhead():
    # A pure-Python busy loop holds the GIL, so on a loaded machine the sampler thread wakes late (~45 ms
    # instead of 20 ms); a 1 s window still leaves ample margin over the 10 samples asserted.
    with Sampler(torch.device("cpu"), interval_s=0.02) as s:
        busy(1.0)
    out = s.result(tokens=100)
    tl = out["timeline"]
    assert out["n_samples"] == len(tl["t_s"]) >= 10
    assert np.all(np.diff(tl["t_s"]) > 0) and tl["t_s"][-1] <= out["window_s"]
    for name in ("cpu_util_process", "cpu_util_system", "rss_mb"):
        v = np.array(tl[name], dtype=float)
        assert out["aggregates"][name]["mean"] == pytest.approx(v.mean())
        assert out["aggregates"][name]["max"] == v.max()
    # the series is % of the usable cores: a single-threaded busy loop reads 100/cores at most. At least 40% of
    # one core, on any number of cores
    assert out["aggregates"]["cpu_util_process"]["mean"] * s._cores > 40
    assert out["util_source"] == "cpu_util_process" and "CPU" in out["labels"]["cpu_util_process"]
    assert 0 < out["overhead"]["fraction_of_window"] < 0.05


def test_without_nvml_the_sampler_falls_back_and_says_why(monkeypatch):
    """On a machine without NVML (or without a GPU), asking for a CUDA device's figures records the reason."""
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails, as without the package (GPU box too)
    with Sampler(torch.device("cuda", 0), interval_s=0.02) as s:
        busy(0.1)
    out = s.result(tokens=10)
    assert out["backend"] == "psutil" and "NVML unavailable" in out["missing"]["gpu"]
    assert out["energy_j"] is None and out["energy_j_per_token"] is None and "energy" in out["missing"]
    assert "gpu_util" not in out["aggregates"] and "cpu_util_process" in out["aggregates"]


def _fake_rapl(root, energy_uj, max_range_uj=None):
    zone = root / "intel-rapl:0"
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range_uj is not None:
        (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone


def test_rapl_energy_over_the_window_is_labelled_package_0_whole_system(tmp_path):
    zone = _fake_rapl(tmp_path, 5_000_000, max_range_uj=262_143_328_850)
    with Sampler(torch.device("cpu"), interval_s=0.02, rapl=zone) as s:
        (zone / "energy_uj").write_text("7500000\n")  # 2.5 J during the window
    out = s.result(tokens=10)
    assert out["energy_j"] == pytest.approx(2.5) and out["energy_j_per_token"] == pytest.approx(0.25)
    assert out["energy_source"].startswith("rapl") and "package 0" in out["energy_source"]
    assert "whole system" in out["energy_source"] and "energy" not in out["missing"]


def test_rapl_counter_wrapping_during_the_window_adds_its_range_back(tmp_path):
    zone = _fake_rapl(tmp_path, 999_000_000, max_range_uj=1_000_000_000)
    with Sampler(torch.device("cpu"), interval_s=0.02, rapl=zone) as s:
        (zone / "energy_uj").write_text("2000000\n")  # 1 J to the wrap at 1000 J, then 2 J past it
    assert s.result(tokens=3)["energy_j"] == pytest.approx(3.0)


def test_rapl_wrap_without_a_readable_range_is_missing_not_negative(tmp_path):
    zone = _fake_rapl(tmp_path, 999_000_000)
    with Sampler(torch.device("cpu"), interval_s=0.02, rapl=zone) as s:
        (zone / "energy_uj").write_text("2000000\n")
    out = s.result(tokens=3)
    assert out["energy_j"] is None and out["energy_j_per_token"] is None and out["energy_source"] is None
    assert "wrapped" in out["missing"]["energy"] and "max_energy_range_uj" in out["missing"]["energy"]


def test_a_gpu_point_without_nvml_never_reports_the_cpu_package_energy(tmp_path, monkeypatch):
    """RAPL counts the CPU package: where NVML cannot start, a CUDA point's energy is missing, not the CPU's."""
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails, as without the package
    zone = _fake_rapl(tmp_path, 1_000_000, max_range_uj=262_143_328_850)
    with Sampler(torch.device("cuda", 0), interval_s=0.02, rapl=zone) as s:
        (zone / "energy_uj").write_text("51000000\n")  # the package spent 50 J
    out = s.result(tokens=100)
    assert out["energy_j"] is None and out["energy_j_per_token"] is None and out["energy_source"] is None
    assert out["missing"]["energy"] == "no NVML for this device"


class _FakeNvml:
    """pynvml's two lookups over a machine of GPUs GPU-a, GPU-b, GPU-c (NVML numbers them all)."""

    def __init__(self, uuid_lookup: bool = True) -> None:
        self.uuids, self.uuid_lookup = ["GPU-a", "GPU-b", "GPU-c"], uuid_lookup

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not self.uuid_lookup:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return ("handle", self.uuids.index(uuid))

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)


def test_nvml_watches_the_gpu_torch_runs_on_under_cuda_visible_devices(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2: torch's cuda:0 is NVML's device 2. By index, the monitor would read another
    job's GPU (its utilization, power and energy)."""
    from types import SimpleNamespace

    from harness.env import nvml_handle

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="c"))
    assert nvml_handle(_FakeNvml(), torch.device("cuda", 0)) == ("handle", 2)
    # without a UUID lookup, torch's translation of the mask; where that fails too, an error, not a wrong GPU
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: 2)
    assert nvml_handle(_FakeNvml(uuid_lookup=False), torch.device("cuda", 0)) == ("handle", 2)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: 1 / 0)
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        nvml_handle(_FakeNvml(uuid_lookup=False), torch.device("cuda", 0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # no mask: the numbering agrees
    assert nvml_handle(_FakeNvml(uuid_lookup=False), torch.device("cuda", 1)) == ("handle", 1)


class _FakePynvml(types.ModuleType):
    """A ``pynvml`` module over one GPU: fixed readings, a total-energy counter that goes from 1 000 000 mJ to
    1 250 000 mJ over the window (read once at its start, once at its end), no GPM, and a temperature reader that
    fails (counted: a reader that failed once must not be called again)."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.energy_mj = iter([1_000_000, 1_250_000])
        self.temp_calls = 0

    def nvmlInit(self):
        pass

    def nvmlGpmQueryDeviceSupport(self, handle):
        return types.SimpleNamespace(isSupportedDevice=False)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return next(self.energy_mj)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=70, memory=30)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=512 * 2**20)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # mW

    def nvmlDeviceGetClockInfo(self, handle, which):
        return 1980 if which == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self.temp_calls += 1
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0x4  # sw_power_cap


def test_gpu_utilization_and_energy_through_nvml(monkeypatch):
    """The GPU path of the sampler on a fake NVML (no GPU needed): the energy counter's difference over the
    window as J and J/token, NVML's util as the table's util series, and a reader that fails once listed in
    ``missing`` and never read again."""
    import sys

    from harness import monitor

    fake = _FakePynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(monitor, "nvml_handle", lambda nv, device: "h")
    with Sampler(torch.device("cuda", 0), interval_s=0.01) as s:
        busy(0.15)
    out = s.result(tokens=100)
    assert out["backend"] == "nvml+psutil" and out["n_samples"] >= 3
    assert out["energy_j"] == pytest.approx(250.0) and out["energy_j_per_token"] == pytest.approx(2.5)
    assert out["energy_source"] == "nvml_total_energy" and "energy" not in out["missing"]
    assert out["util_source"] == "gpu_util" and "kernel was running" in out["labels"]["gpu_util"]
    agg = out["aggregates"]
    assert agg["gpu_util"] == {"mean": 70.0, "max": 70.0} and agg["mem_util"]["mean"] == 30.0
    assert agg["power_w"]["mean"] == 250.0 and agg["mem_used_mb"]["mean"] == 512.0
    assert agg["sm_clock_mhz"]["mean"] == 1980.0 and agg["mem_clock_mhz"]["mean"] == 2619.0
    assert agg["throttle_reasons"]["reasons"] == ["sw_power_cap"] and agg["throttle_reasons"]["fraction_throttled"] == 1
    assert len(out["timeline"]["gpu_util"]) == out["n_samples"] and "cpu_util_process" in agg  # host series too
    assert out["missing"]["temp_c"] == "NVML: RuntimeError: NVML_ERROR_NOT_SUPPORTED" and "temp_c" not in agg
    assert fake.temp_calls == 1  # dropped after its first failure
    assert out["missing"]["sm_active"] == "GPM not supported by this GPU or driver"


class _FakeGpm:
    """pynvml's GPM calls: each sample holds the fake clock; SM_UTIL is the span between two samples in ms."""

    NVML_SUCCESS, NVML_GPM_METRICS_GET_VERSION, NVML_GPM_METRIC_SM_UTIL = 0, 1, 2

    def __init__(self, metric_status: int = 0) -> None:
        self.now, self.metric_status, self.freed = 0.0, metric_status, 0

    def nvmlGpmQueryDeviceSupport(self, handle):
        return types.SimpleNamespace(isSupportedDevice=True)

    def nvmlGpmSampleAlloc(self):
        return types.SimpleNamespace(t=None)

    def nvmlGpmSampleGet(self, handle, sample):
        sample.t = self.now

    def nvmlGpmSampleFree(self, sample):
        self.freed += 1

    def c_nvmlGpmMetricsGet_t(self):
        return types.SimpleNamespace(metrics=[types.SimpleNamespace()])

    def nvmlGpmMetricsGet(self, m):
        m.metrics[0].value = (m.sample2.t - m.sample1.t) * 1e3
        m.metrics[0].nvmlReturn = self.metric_status


def _gpm_reader(fake: _FakeGpm, monkeypatch):
    from harness import monitor

    monkeypatch.setattr(monitor.time, "perf_counter", lambda: fake.now)  # the reader's clock is the fake's
    nv = object.__new__(monitor._Nvml)
    nv.nv, nv.handle, nv.missing = fake, "h", {}
    nv.gpm = nv._gpm_setup()
    return nv


def test_gpm_sm_activity_covers_the_window_and_spans_at_least_the_minimum(monkeypatch):
    from harness.monitor import GPM_MIN_SPAN_S

    fake = _FakeGpm()
    nv = _gpm_reader(fake, monkeypatch)
    fake.now = 5.0  # warm-up ran since the reader was made: the window's start re-takes the baseline
    nv.start()
    fake.now = 5.0 + GPM_MIN_SPAN_S / 2
    assert nv._sm_active() == {}  # too close to the baseline: no value yet, the baseline kept
    fake.now = 5.0 + 2 * GPM_MIN_SPAN_S
    assert nv._sm_active() == {"sm_active": pytest.approx(2e3 * GPM_MIN_SPAN_S)}  # from 5.0, not from 0
    fake.now += 1.5 * GPM_MIN_SPAN_S
    assert nv._sm_active() == {"sm_active": pytest.approx(1.5e3 * GPM_MIN_SPAN_S)}


def test_a_gpm_metric_nvml_could_not_compute_is_missing_not_a_value(monkeypatch):
    fake = _FakeGpm(metric_status=3)
    nv = _gpm_reader(fake, monkeypatch)
    fake.now = 1.0
    assert nv._sm_active() == {} and nv.gpm is None
    assert nv.missing["sm_active"] == "GPM SM_UTIL metric returned NVML error 3"


def test_without_rapl_energy_is_missing_with_the_reason(tmp_path):
    with Sampler(torch.device("cpu"), interval_s=0.02, rapl=tmp_path / "absent") as s:
        pass
    out = s.result(tokens=3)
    assert out["energy_j"] is None and out["missing"]["energy"].startswith("RAPL not readable")


def test_categories():
    assert categorize("aten::mm") == "matmul" and categorize("aten::_weight_int8pack_mm") == "matmul"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert categorize("aten::rsqrt") == "norm" and categorize("aten::mean") == "norm"
    assert categorize("aten::mul") == "elementwise" and categorize("aten::silu") == "elementwise"
    assert categorize("aten::index_copy_") == "copy" and categorize("aten::_to_copy") == "copy"
    assert categorize("aten::as_strided") == "other"
    # beam search's log-softmax over the vocabulary is not attention; SDPA's math-path softmax is
    assert categorize("aten::_log_softmax") == "elementwise" and categorize("aten::_softmax") == "attention"
    # CUDA kernels by their own names: cuBLAS, flash attention, this project's Triton kernels
    assert categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert categorize("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert categorize("_decode_attention_split_kernel") == categorize("_decode_attention_merge_kernel") == "attention"
    assert categorize("_add_rmsnorm_kernel") == "norm" and categorize("_int8_matmul_kernel") == "matmul"
    assert categorize("_swiglu_kernel") == categorize("_rope_kernel") == "elementwise"
    # cuBLAS 12.4+ on sm_90: nvjet GEMMs and their split-K reduction; index_copy_'s CUDA kernel
    assert categorize("nvjet_tst_64x8_64x16_2x1_v_bz_splitK_TNT") == categorize("splitKreduce_kernel") == "matmul"
    assert categorize("void at::native::indexFuncLargeIndex<float, long>") == "copy"


def test_profiling_keeps_the_timed_cache_and_warms_up_outside_the_profiled_steps(tmp_path, monkeypatch):
    """A cache of another length is another shape (a recompile, a CUDA-graph capture, a re-tune); what
    setup_caches resets is absorbed by an unprofiled generation before the profiler starts."""
    from engines.llama import ModelArgs, Transformer
    from harness import profiling

    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64,
                     max_seq_len=64)  # fmt: skip
    model = Transformer.build(args).eval()
    sizes, profiled = [], []
    real_setup = profiling.setup_caches
    monkeypatch.setattr(profiling, "setup_caches", lambda m, rows, n: (sizes.append(n), real_setup(m, rows, n)))
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (profiled.append(torch.autograd._profiler_enabled()),
                                                           real_forward(*a, **k))[1])  # fmt: skip
    prompt = torch.randint(0, 64, (1, 8))
    out = profiling.profile_decode(model, prompt, "greedy", 1, 1, 3, tmp_path, torch.device("cpu"), cache_len=40)
    assert sizes == [40]  # the timed run's prompt_len + gen_len, not prompt_len + steps + 1 = 12
    # 4 forwards (prefill + 3 decode steps) unprofiled, then the profiled generation: only its decode steps
    assert profiled[:4] == [False] * 4 and profiled[4] is False and profiled[5:8] == [True] * 3
    assert out["steps"] == 3 and (tmp_path / "trace.json").exists()
    profiling.profile_decode(model, prompt, "greedy", 1, 1, 3, tmp_path, torch.device("cpu"), cache_len=10)
    assert sizes[-1] == 12  # a longer profile than the timed generation gets the cache it needs


def test_cuda_kernel_time_is_counted_once():
    """torch's profiler lists a kernel as its own device event and again inside the op that launched it; the
    breakdown counts the kernel, as torch's own table does (no GPU needed: the events are built by hand)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from harness.profiling import _self_times_ms

    op = FunctionEvent(1, "aten::mm", thread=0, start_us=0, end_us=20, use_device="cuda", stack=[], input_shapes=[])
    kernel = FunctionEvent(2, "sm90_xmma_gemm_f32f32", thread=0, start_us=30, end_us=130, use_device="cuda",
                           device_type=DeviceType.CUDA, stack=[], input_shapes=[])  # fmt: skip
    op.append_kernel(kernel.name, 0, 100)
    events = EventList([op, kernel], use_device="cuda")
    events._build_tree()

    class Prof:
        def key_averages(self):
            return events.key_averages()

    assert _self_times_ms(Prof(), torch.device("cuda")) == {"sm90_xmma_gemm_f32f32": pytest.approx(0.1)}


def test_a_point_records_monitor_roofline_and_profile(run_harness, tmp_path):
    code = run_harness("run", *QUICK, "profile=true", "profile_steps=4", "monitor.interval_s=0.02",
                       "measure.target_ci=0.0001", "measure.max_time_s=0.6", "measure.max_reps=1000",
                       f"cache_dir={tmp_path / 'cache'}", "roofline.bandwidth_gbs=20", "roofline.tflops=0.1",
                       f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 0
    rec = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    mon = rec["monitor"]
    assert mon["n_samples"] >= 10 and len(mon["timeline"]["cpu_util_process"]) == mon["n_samples"]
    assert mon["energy_j"] is not None or mon["missing"]["energy"].startswith("RAPL not readable")
    roof = rec["roofline"]
    assert roof["peaks"]["source"] == "config" and roof["peaks"]["bandwidth_gbs"] == 20
    assert roof["decode"]["mbu"] == pytest.approx(roof["decode"]["achieved_gbs"] / 20)
    prof = rec["profile"]
    total = sum(prof["breakdown_ms"].values())
    assert set(prof["breakdown_ms"]) == set(CATEGORIES) and prof["steps"] == 4
    assert total == pytest.approx(prof["total_ms"], rel=0.05)  # the categories account for the profiled time
    assert prof["breakdown_ms"]["matmul"] > 0 and prof["breakdown_ms"]["attention"] > 0
    trace = json.loads((tmp_path / "run" / prof["trace"]).read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])  # opens in Perfetto / chrome://tracing
    row = load(tmp_path / "run").iloc[0]
    assert row.util_mean == pytest.approx(mon["aggregates"]["cpu_util_process"]["mean"])
    assert row.mbu == roof["decode"]["mbu"] and row.mfu == roof["prefill"]["mfu"]


def test_monitor_roofline_and_profile_can_be_switched_off(run_harness, tmp_path):
    code = run_harness("run", *QUICK, "monitor.enabled=false", "roofline.enabled=false",
                       f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert code == 0
    rec = json.loads((tmp_path / RECORD_NAME).read_text())
    assert "monitor" not in rec and "roofline" not in rec and "profile" not in rec
    assert not (tmp_path / "trace.json").exists()
