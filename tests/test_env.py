"""The environment a point runs in: huge pages for weights (measured, not assumed), the thread count, and the git
state of the measured checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import harness.env
from harness.env import fingerprint, fingerprint_id, git_state, huge_pages
from harness.point import DEFAULT_THREADS, apply_process_settings

PROBE = "from harness.env import huge_pages; import json; print(json.dumps(huge_pages()))"


def _probe(env: dict[str, str]) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_huge_pages_are_probed_in_a_fresh_process(subprocess_env):
    """With THP_MEM_ALLOC_ENABLE=1 and a kernel that allows it, a large tensor lands on huge pages; with 0 it does
    not (unless the kernel gives them to every allocation: THP `always`)."""
    on = _probe({**subprocess_env, "THP_MEM_ALLOC_ENABLE": "1"})
    off = _probe({**subprocess_env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert on["torch_alloc"] == "1" and off["torch_alloc"] == "0"
    if on["system"] in ("madvise", "always"):
        assert on["in_use"] is True
    if on["system"] in ("madvise", "never"):
        assert off["in_use"] is False


def test_the_cli_turns_huge_pages_on_unless_the_user_chose(subprocess_env):
    code = "import os; from harness.cli import main; main(['--help']); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in subprocess_env.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    chosen = subprocess.run(
        [sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, capture_output=True, text=True
    )
    assert default.stdout.strip().splitlines()[-1] == "1"
    assert chosen.stdout.strip().splitlines()[-1] == "0"


def test_fingerprint_records_huge_pages_and_keeps_older_ids():
    fp = fingerprint(torch.device("cpu"))
    assert fp["huge_pages"] == huge_pages()
    without = {**fp, "huge_pages": {**fp["huge_pages"], "in_use": False}}
    older = {k: v for k, v in fp.items() if k != "huge_pages"}  # a record from before the field existed
    assert fingerprint_id(without) == fingerprint_id(older)
    assert fingerprint_id({**fp, "huge_pages": {"in_use": True}}) != fingerprint_id(older)


def test_the_fingerprint_id_follows_the_gpu_power_limit_and_clock_cap_not_the_current_clock():
    """A GPU capped at 350 W (or clocks locked lower) is another machine for every timing; the clock it ran at
    the moment it was read is not."""
    cuda = {"driver": "570.1", "power_limit_w": 700.0, "max_sm_clock_mhz": 1980, "sm_clock_mhz": 1755}
    gpu = {"device_type": "cuda", "device_name": "NVIDIA H100", "versions": {"torch": "2.13.0"}, "cuda": cuda}
    base = fingerprint_id(gpu)
    assert fingerprint_id({**gpu, "cuda": {**gpu["cuda"], "power_limit_w": 350.0}}) != base
    assert fingerprint_id({**gpu, "cuda": {**gpu["cuda"], "max_sm_clock_mhz": 1400}}) != base
    assert fingerprint_id({**gpu, "cuda": {**gpu["cuda"], "sm_clock_mhz": 345}}) == base


def test_the_fingerprint_id_follows_the_software_stack_and_threads_not_the_host_or_commit():
    """What changes speed changes the id (torch and its thread count, triton, the device); what does not (the
    host's name, the commit measured, the time) leaves it: the gate compares commits on one machine."""
    fp = fingerprint(torch.device("cpu"))
    assert fingerprint_id(fp) == fp["id"]
    versions = fp.get("versions", {})
    for changed in ({"torch_threads": (fp.get("torch_threads") or 1) + 7},
                    {"versions": {**versions, "torch": "0.0.1"}}, {"versions": {**versions, "triton": "0.0.1"}},
                    {"device_name": "another device"}, {"cpu_model": "another CPU"}):  # fmt: skip
        assert fingerprint_id({**fp, **changed}) != fp["id"], changed
    same = {"hostname": "elsewhere", "git": {"sha": "f" * 40, "dirty": True}, "timestamp": "2030-01-01T00:00:00"}
    assert fingerprint_id({**fp, **same}) == fp["id"]


def test_apply_process_settings_sets_and_restores(compose_cfg):
    from harness.config import validate

    try:
        apply_process_settings(validate(compose_cfg("threads=1")))
        assert torch.get_num_threads() == 1
        assert fingerprint(torch.device("cpu"))["torch_threads"] == 1
        apply_process_settings(validate(compose_cfg()))
        assert torch.get_num_threads() == DEFAULT_THREADS
    finally:
        torch.set_num_threads(DEFAULT_THREADS)


def test_a_cuda_point_makes_its_gpu_the_current_device(compose_cfg, monkeypatch):
    """CUDA events record on the current device's stream and Triton launches on it: device=cuda:1 must be it."""
    import dataclasses

    from harness.config import validate

    cpu_spec = validate(compose_cfg("device=cpu"))
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    try:
        apply_process_settings(dataclasses.replace(cpu_spec, device=torch.device("cuda", 1)))
        apply_process_settings(cpu_spec)  # a CPU point leaves the current GPU alone
    finally:
        torch.set_num_threads(DEFAULT_THREADS)
    assert chosen == [torch.device("cuda", 1)]


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    ident = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    out = subprocess.run(["git", *ident, *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_git_state_is_the_measured_checkouts_and_falls_back_to_the_harness_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    harness_dir = Path(harness.env.__file__).resolve().parent
    harness_head = subprocess.run(
        ["git", "rev-parse", "HEAD", "--show-toplevel"], cwd=harness_dir, capture_output=True, text=True
    )

    monkeypatch.chdir(repo)  # a point measured from inside the project: its commit, clean
    state = git_state()
    assert state == {"sha": head, "dirty": False, "repo": str(repo.resolve())}
    assert fingerprint(torch.device("cpu"))["git"] == state  # and the record carries it
    assert git_state(repo)["sha"] == head  # an explicit path wins over the cwd
    (repo / "model.py").write_text("x = 2\n")  # a tracked file edited: dirty; untracked files do not count
    (repo / "notes.txt").write_text("scratch\n")
    assert git_state() == {**state, "dirty": True}

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above tmp_path
    monkeypatch.chdir(outside)
    fallback = git_state()
    if harness_head.returncode == 0:  # outside any repo: the checkout the harness runs from
        sha, top = harness_head.stdout.split()
        assert fallback["sha"] == sha != head and fallback["repo"] == top
    else:
        assert fallback == {"sha": None, "dirty": None, "repo": None}
    # and where neither the cwd nor the harness is a checkout, every field is None (no crash, no guess)
    monkeypatch.setattr(harness.env, "__file__", str(outside / "env.py"))
    assert git_state() == {"sha": None, "dirty": None, "repo": None}


SPR_FLAGS = "avx512f avx512_bf16 amx_bf16 amx_tile"
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: {model}
model name\t: Intel(R) Xeon(R) Processor
stepping\t: {stepping}
cache size\t: 307200 KB
flags\t\t: fpu sse sse2 avx avx2 fma {extra}

processor\t: 1
vendor_id\t: GenuineIntel
model\t\t: 1
"""


def _cpu(tmp_path: Path, name: str, cache: dict[str, tuple[str, str, str]] | None = None, **fields) -> dict:
    """``cpu_info`` of a machine whose /proc/cpuinfo reads ``XEON`` with ``fields`` and whose sysfs cache folder
    holds ``cache`` (index: level, type, size)."""
    root = tmp_path / name
    (root / "cache").mkdir(parents=True)
    (root / "cpuinfo").write_text(XEON.format(**{"model": 143, "stepping": 8, "extra": "", **fields}))
    for index, (level, kind, size) in (cache or {}).items():
        (root / "cache" / index).mkdir()
        for file, value in (("level", level), ("type", kind), ("size", size)):
            (root / "cache" / index / file).write_text(value + "\n")
    return harness.env.cpu_info(root / "cpuinfo", root / "cache")


def test_two_vms_with_one_cpu_model_name_get_different_fingerprints(tmp_path):
    """`Intel(R) Xeon(R) Processor` names a Sapphire Rapids and an Ice Lake VM alike: family, model, stepping, the
    ISA extensions and the cache sizes tell them apart, in the record and in its id; the clock is recorded only."""
    l3 = {"index0": ("1", "Data", "48K"), "index2": ("2", "Unified", "2048K"), "index3": ("3", "Unified", "105M")}
    spr = _cpu(tmp_path, "spr", l3, model=143, stepping=8, extra=SPR_FLAGS)
    assert {k: spr[k] for k in ("vendor", "family", "model", "stepping")} == {
        "vendor": "GenuineIntel", "family": "6", "model": "143", "stepping": "8",
    }  # fmt: skip
    assert spr["isa"] == ["avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert spr["cache_kb"] == {"l1d": 48, "l2": 2048, "l3": 105 * 1024}
    icx = _cpu(tmp_path, "icx", {**l3, "index3": ("3", "Unified", "48M")}, model=106, stepping=6, extra="avx512f")
    same_isa = _cpu(tmp_path, "spr-l3", {**l3, "index3": ("3", "Unified", "60M")}, extra=SPR_FLAGS)
    assert same_isa["isa"] == spr["isa"]

    fp = fingerprint(torch.device("cpu"))
    assert fp["cpu"] == harness.env.cpu_info() and "isa" in fp["cpu"] and "cache_kb" in fp["cpu"]
    assert fp["cpu_model"] == harness.env.cpu_model()  # the name stays beside the details
    ids = {fingerprint_id({**fp, "cpu": cpu}) for cpu in (spr, icx, same_isa)}
    assert len(ids) == 3  # model/stepping/ISA, or the last-level cache alone, make another environment
    assert fingerprint_id({**fp, "cpu": dict(spr)}) == fingerprint_id({**fp, "cpu": spr})
    # the clock is recorded where psutil reads it, and never changes the id
    freq = fp["cpu_freq_mhz"]
    assert freq is None or set(freq) == {"current", "min", "max"}
    assert fingerprint_id({**fp, "cpu_freq_mhz": {"current": 1.0, "min": None, "max": None}}) == fp["id"]
    older = {k: v for k, v in fp.items() if k != "cpu"}  # a record from before the field: its id holds
    assert fingerprint_id(older) != fp["id"] and fingerprint_id(older) == fingerprint_id({**older, "cpu": {}})


def test_cpu_details_without_proc_cpuinfo_or_sysfs(tmp_path, monkeypatch):
    """No /proc/cpuinfo (macOS, some containers), no sysfs, no readable clock: the fingerprint still forms."""
    bare = harness.env.cpu_info(tmp_path / "no-cpuinfo", tmp_path / "no-cache")
    assert bare["isa"] == [] and bare["cache_kb"] == {} and "model" not in bare
    (tmp_path / "cpuinfo").write_text(XEON.format(model=85, stepping=7, extra=""))
    only_cpuinfo = harness.env.cpu_info(tmp_path / "cpuinfo", tmp_path / "no-cache")
    assert only_cpuinfo["cache_kb"] == {"cpuinfo_cache_size": 307200} and only_cpuinfo["model"] == "85"

    def unreadable():
        raise OSError("no clock here")

    monkeypatch.setattr(harness.env.psutil, "cpu_freq", unreadable)
    assert harness.env.cpu_freq_mhz() is None
    monkeypatch.setattr(harness.env, "cpu_info", lambda: bare)
    fp = fingerprint(torch.device("cpu"))
    assert fp["cpu"] == bare and fp["cpu_freq_mhz"] is None and len(fp["id"]) == 12


def test_env_names_a_cache_dir_it_cannot_make_in_one_line(run_harness, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert run_harness("env", "--cache-dir", str(a_file / "peaks")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness env: error: --cache-dir: cannot create "), err
