"""The console script: help, env, unknown commands; `run`'s Hydra flags and its sweep progress line."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from harness.cli import COMMANDS, main
from harness.progress import progress, progress_text, write_sweep_meta


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run [hydra args...]" in out and "env [--json]" in out
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: harness <command>")  # no command: the usage is the error
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"harness frobnicate: error: unknown command 'frobnicate'; allowed: {', '.join(COMMANDS)}"
    assert list(COMMANDS)[:2] == ["run", "env"] and "report" in COMMANDS


def _env_value(out: str, key: str) -> str:
    """The value printed for ``key`` by `harness env` (``key<padding>  value``)."""
    rows = [line for line in out.splitlines() if line.startswith(key + " ")]
    assert len(rows) == 1, out
    return rows[0][len(key) :].strip()


@pytest.fixture()
def fake_peaks(monkeypatch) -> list[str]:
    """`harness env` without measuring this machine (that is test_roofline's, mocked): the peak measurements
    return 20 GB/s over 8 MiB buffers and 100 GFLOP/s; the list records each one taken."""
    import harness.roofline as roof

    calls: list[str] = []
    monkeypatch.setattr(roof, "measure_bandwidth", lambda d: calls.append("bw") or {
        "bandwidth_gbs": 20.0, "copy_gbs": 15.0, "buffer_bytes": 8 << 20, "llc_bytes": 2 << 20})  # fmt: skip
    monkeypatch.setattr(roof, "measure_flops", lambda d, t: calls.append("fl") or {"flops": 1e11, "matmul_n": 64})
    return calls


def test_env_prints_device_threads_versions_and_git(capsys, fake_peaks):
    import harness.config

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("device", "torch threads", "version.torch", "git", "fingerprint", "cpu"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    # the peaks, measured once into the default cache (the session's tmp one: tests never touch the user's)
    assert _env_value(out, "read bandwidth").startswith("20.0 GB/s (the MBU roof; 8 MiB buffers; last-level cache 2")
    assert _env_value(out, "copy bandwidth") == "15.0 GB/s (read + write)"
    assert _env_value(out, "matmul").startswith("100.0 GFLOP/s")
    cache = _env_value(out, "peaks cache")
    assert cache.startswith(str(harness.config.DEFAULT_CACHE_DIR / "peaks")) and os.path.isfile(cache)
    assert main(["env"]) == 0 and sorted(fake_peaks) == ["bw", "fl"]  # the second call reads the cache
    capsys.readouterr()
    assert _env_value(out, "torch threads") == str(torch.get_num_threads())
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:  # the current count, not a number that happens to be printed elsewhere (the CPU count, a version)
        torch.set_num_threads(other)
        assert main(["env", "--no-peaks"]) == 0
        assert _env_value(capsys.readouterr().out, "torch threads") == str(other)
    finally:
        torch.set_num_threads(before)


def test_env_json_is_the_record_fingerprint(capsys, fake_peaks):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp["device_type"] == "cpu" and fp["versions"]["torch"].startswith("2.13.0") and len(fp["id"]) == 12


def test_env_bad_device(capsys):
    assert main(["env", "--device", "gpu7"]) == 2
    assert "device: 'gpu7' is not a device" in capsys.readouterr().err


def test_env_and_train_argument_errors_are_one_line_exit_2(capsys):
    for argv, first in (
        (["env", "--bogus"], "harness env: error: unrecognized arguments: --bogus"),
        (["train", "--bogus"], "harness train: error: unrecognized arguments: --bogus"),
        (["train", "-m", "model=tiny"], "harness train: error: -m/--multirun: `harness train` trains one model"),
    ):
        assert main(argv) == 2, argv
        io = capsys.readouterr()
        assert io.err.count("\n") == 1 and io.err.startswith(first) and "usage:" not in io.err and not io.out, io.err


@pytest.mark.filterwarnings("ignore:Experimental rerun CLI option")
def test_run_composition_errors_name_what_is_allowed(run_harness, capsys):
    """Hydra's own errors as one line that names what is allowed: a nested group's options (not its parent's),
    the top-level fields for a mistyped one given without +, a group chosen again with +, a bad flag value."""
    cases = [
        (["engine=quantized/nosuch"],
         "engine/quantized: unknown option 'nosuch'; allowed: fp8, int4_weight_only, int8_dynamic, int8_triton, "
         "int8_weight_only"),
        (["devcie=cpu"], "devcie: unknown field; allowed: cache_dir, corpus, device, dtype, engine, isolate, "),
        (["+model=small"], "model: already chosen by the config; use model=small (without the leading +)"),
        (["--cfg", "bogus"], "argument --cfg/-c: invalid choice: 'bogus' (choose from 'job', 'hydra', 'all')"),
        # raised inside Hydra's own set-up, before any point: the command line is wrong, not the harness
        (["hydra.sweeper.params.x=1"], "hydra.sweeper.params: not set in this config, so its keys cannot be "),
        (["--experimental-rerun", "/nonexistent"], "ValueError: File /nonexistent does not exist! (raised by Hydra"),
    ]  # fmt: skip
    for args, message in cases:
        assert run_harness("run", *args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"harness run: error: {message}"), err
        assert "prefix with +" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a launcher group's options: the configs on disk and the ConfigStore's (basic, interleaved, the plugins')
        (["-m", "hydra/launcher=bogus"],
         "hydra/launcher: unknown option 'bogus'; allowed: basic, interleaved, joblib, slurm, submitit_local, "
         "submitit_slurm"),
        # a field the validator accepts but the composed YAML lacks: how to add it, or the option that has it
        (["model.head_dim=64"], "model.head_dim: not in the composed config; add it with +model.head_dim=64"),
        (["engine.name=quantized", "engine.scheme=int4_weight_only"],
         "engine.scheme: a parameter of engine 'quantized', which the config of engine=eager leaves out; choose "
         "engine=quantized (or add it with +engine.scheme=int4_weight_only)"),
        # an unknown field lists what the validator accepts, not only the YAML's keys
        (["model.nosuch=1"], "model.nosuch: unknown field; allowed: dim, head_dim, intermediate_size, "),
        # a structured config of Hydra's: its fields, and the launcher that has the key
        (["-m", "hydra.launcher.n_jobs=2"],
         "hydra.launcher.n_jobs: unknown field of BasicLauncherConf; allowed: _target_; choose a hydra/launcher that "
         "has it: joblib (e.g. hydra/launcher=joblib hydra.launcher.n_jobs=2)"),
        (["hydra.run.nodir=x"], "hydra.run.nodir: unknown field of RunDir; allowed: dir"),
    ],
)  # fmt: skip
def test_unknown_options_and_fields_list_what_is_really_allowed(run_harness, tmp_path, capsys, args, message):
    code = run_harness("run", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"harness run: error: {message}"), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a group that chooses one option: a list would merge its options into one point (the last wins)
        (["engine=[eager, pruned]"], "engine: choose one option, or sweep with -m engine=eager,pruned"),
        (["+model=[tiny,small]"], "model: choose one option, or sweep with -m model=tiny,small"),
        (["engine=eager,pruned"], "engine: choose one option, or sweep with -m engine=eager,pruned"),  # no -m
        # a Hydra flag after some overrides: argparse reads none of the overrides after it
        (["model=tiny", "-m", "model.vocab_size=1,256"],
         "-m: Hydra's flags (-m, --cfg, --config-dir, ...) go before the overrides, e.g. `harness run -m key=value "
         "...`; after them, argparse took the rest for unrecognized arguments: model.vocab_size=1,256"),
        (["-p", "model"], "-p/--package: only used with --cfg, to print one package of the composed config"),
        # what -p can print, named (Hydra's own: a bare "package ... not found" and exit 1)
        (["--cfg", "job", "-p", "modle"], "-p/--package: 'modle' is not in the composed --cfg job config; allowed: "
         "model, engine, workload,"),
        (["--cfg", "hydra", "-p", "model"], "-p/--package: 'model' is not in the composed --cfg hydra config; "
         "allowed: hydra (or a dotted path inside one, e.g. hydra."),
        (["--cfg", "job", "-p", "roofline.tflops"], "-p/--package: roofline.tflops is null in the composed config, "
         "which Hydra's -p does not print; print its parent instead (-p roofline)"),
    ],
)  # fmt: skip
def test_command_lines_hydra_would_misread_are_refused(run_harness, tmp_path, capsys, args, message):
    code = run_harness("run", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    io = capsys.readouterr()
    assert code == 2 and io.err.count("\n") == 1 and io.err.startswith(f"harness run: error: {message}"), io.err
    assert not io.out and not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_errors_and_train_see_the_users_config_dir(run_harness, tmp_path, capsys):
    """--config-dir options are listed in the messages that name what is allowed, and `harness train` takes the
    flag too."""
    user = tmp_path / "ucfg"
    (user / "model").mkdir(parents=True)
    (user / "model" / "mini.yaml").write_text("defaults:\n  - tiny\n  - _self_\nname: mini\ndim: 32\n")
    assert run_harness("run", "--config-dir", str(user), "model=null") == 2
    assert "allowed: llama-3-8b, llama-3.2-1b, medium, mini, small, tiny" in capsys.readouterr().err
    assert run_harness("run", "--config-dir", str(user), "model=mini", "model.dimm=3") == 2
    assert "model.dimm: unknown field; allowed: dim, " in capsys.readouterr().err
    assert run_harness("train", "--config-dir", str(user), "model=mini", "model.nosuch=1") == 2
    assert "model.nosuch: unknown field; allowed: dim, " in capsys.readouterr().err
    assert run_harness("train", "-cd", str(tmp_path / "none"), "model=mini") == 2
    assert "--config-dir: " in capsys.readouterr().err


def test_usage_goes_to_stderr_without_a_command_and_a_closed_pipe_is_quiet(tmp_path, subprocess_env):
    import subprocess
    import sys

    bare = subprocess.run([sys.executable, "-m", "harness"], capture_output=True, text=True, env=subprocess_env)
    assert bare.returncode == 2 and not bare.stdout and bare.stderr.startswith("usage: harness <command>")
    piped = subprocess.run(f"{sys.executable} -m harness env --no-peaks | head -1", shell=True, capture_output=True,
                           text=True, env=subprocess_env, cwd=tmp_path)  # fmt: skip
    assert piped.stdout.startswith("device") and "Traceback" not in piped.stderr and not piped.stderr, piped.stderr


def test_run_hydra_flags_that_exclude_each_other_are_one_line_exit_2(run_harness, capsys):
    assert run_harness("run", "-m", "engine=eager", "--cfg", "job") == 2
    io = capsys.readouterr()
    assert io.err.count("\n") == 1 and "Traceback" not in io.err and not io.out, io.err
    assert io.err.startswith("harness run: error: -m/--multirun and --cfg job: only one of --run, -m/--multirun, --cfg")
    assert run_harness("run", "--resolve") == 2
    assert capsys.readouterr().err.strip() == (
        "harness run: error: --resolve: only allowed with --cfg or --help (e.g. `harness run --cfg job --resolve`)"
    )
    assert run_harness("run", "--cfg", "job", "workload.batch_size=3") == 0  # every Hydra flag still works
    assert "batch_size: 3" in capsys.readouterr().out


def test_progress_of_a_resumed_sweep_rates_only_what_this_run_measured(tmp_path, synthetic_point):
    """Resumed (resume=true): job 0's good record and the failed ones of jobs 1 and 2 are from an earlier run;
    this run, started a minute ago, has measured job 1 again."""
    recs = [synthetic_point(tmp_path / "0", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=1)]
    recs += [synthetic_point(tmp_path / str(j), batch_size=j + 1, status="failed", error="boom") for j in (1, 2)]
    now = time.time()
    for j in range(3):
        os.utime(tmp_path / str(j) / "record.json", (now - 3600, now - 3600))
    meta = {"total": 3, "started_unix": now - 60, "point_keys": [r["point_key"] for r in recs]}
    write_sweep_meta(tmp_path, {**meta, "command": ["harness", "run", "-m", "resume=true"]})
    first = progress(tmp_path, 0)
    text = progress_text(first)
    assert first["eta_s"] is None and text.startswith("[1/3] elapsed 1:0") and text.endswith(", ETA ?")  # none yet

    synthetic_point(tmp_path / "1", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=2)  # written by this run
    p = progress(tmp_path, 2)
    assert p["measured"] == 1 and p["done"] == 2  # job 0 is not run again, job 2 is
    assert 55 < p["eta_s"] < 70 and progress_text(p).startswith("[3/3] elapsed 1:00, ETA 1:0")  # 1 point at 60 s
    write_sweep_meta(tmp_path, {**meta, "command": ["harness", "run", "-m"]})  # not resumed: all 3 run again
    assert 110 < progress(tmp_path, 2)["eta_s"] < 130
