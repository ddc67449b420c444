"""Config validation: each bad input is one line naming the field and what is allowed, exit code 2, no work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.config import ConfigError, validate
from harness.paths import config_dir


def test_default_config_is_valid(compose_cfg):
    spec = validate(compose_cfg())
    assert spec.engine.name == "eager" and spec.model.name == "tiny"
    assert spec.workload.batch_size == 1 and spec.policy.name == "default"
    assert spec.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert spec.dtype == (torch.float32 if spec.device.type == "cpu" else spec.dtype)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["workload.batch_size=-1"], r"^workload\.batch_size: must be an integer >= 1, got -1$"),
        (["workload.batch_size=abc"], r"^workload\.batch_size: expected an integer >= 1, got 'abc'$"),
        (
            ["workload.prompt_len=1000", "workload.gen_len=100"],
            r"^workload\.prompt_len \+ workload\.gen_len: 1000 \+ 100 = 1100 exceeds model\.max_seq_len=1024",
        ),
        (["workload.gen_len=1"], r"^workload\.gen_len: must be an integer >= 2"),
        (["workload.decoding=topk"], r"^workload\.decoding: 'topk' is not supported; allowed: greedy, beam$"),
        (["workload.num_beams=4"], r"^workload\.num_beams: must be 1 with decoding=greedy"),
        (["dtype=int3"], r"^dtype: 'int3' is not supported; allowed: auto, fp32, bf16, fp16$"),
        (["device=tpu"], r"^device: 'tpu' is not a device; allowed: auto, cpu, cuda, cuda:N$"),
        (["model.n_kv_heads=3"], r"^model\.n_kv_heads: must divide model\.n_heads=8, got 3$"),
        (["+model.flash=true"], r"^model\.flash: unknown field; allowed: "),
        (["engine.name=nope"], r"^engine\.name: unknown engine 'nope'; allowed: .*eager"),
        (["+engine.bits=4"], r"^engine\.bits: not a parameter of engine 'eager'; allowed: \(none\)$"),
        (["measure.max_reps=2", "measure.min_reps=5"], r"^measure\.max_reps: must be >= measure\.min_reps=5, got 2$"),
        (["measure.target_ci=0"], r"^measure\.target_ci: must be > 0"),
        (["measure.warmup_max_s=0.1"], r"^measure\.warmup_max_s: 0\.1 is below measure\.warmup_s=0\.5, the least "),
        (["seed=-3"], r"^seed: must be an integer >= 0, got -3$"),
        (["quality.decode_positions=256"],
         r"^quality\.decode_positions: 256 is not allowed; allowed: 0\.\.255 \(below quality\.seq_len=256\)$"),
        (["quality.decode_positions=-1"], r"^quality\.decode_positions: must be an integer >= 0, got -1$"),
        (["seed=18446744073709551616"], r"^seed: must be an integer in 0\.\.4294967295, got 18446744073709551616$"),
        # nan passes every comparison (a warm-up that never ends, a sampler that never waits), inf is no size
        (["measure.warmup_stable_rel=nan"], r"^measure\.warmup_stable_rel: must be a finite number, got nan$"),
        (["measure.timeout_s=inf"], r"^measure\.timeout_s: must be a finite number, got inf$"),
        (["monitor.interval_s=nan"], r"^monitor\.interval_s: must be a finite number, got nan$"),
        (["model.rope_base=nan"], r"^model\.rope_base: must be a finite number, got nan$"),
        (["train.lr=inf"], r"^train\.lr: must be a finite number, got inf$"),
        (["threads=0"], r"^threads: 0 is not allowed; allowed: auto, or an integer 1\.\.\d+ \(usable CPUs\)$"),
        (["threads=many"], r"^threads: 'many' is not allowed; allowed: auto, or an integer 1\.\.\d+"),
        (["threads=4096"], r"^threads: 4096 is not allowed; allowed: auto, or an integer 1\.\.\d+"),
        (["train.precision=fp8"], r"^train\.precision: 'fp8' is not allowed; allowed: auto, fp32, bf16$"),
        (["train.warmup_steps=-1"], r"^train\.warmup_steps: must be an integer >= 0, got -1$"),
        (["measure.disable_gc=maybe"], r"^measure\.disable_gc: expected true or false, got 'maybe'$"),
        (["+isolat=true"], r"^isolat: unknown field; allowed: cache_dir, corpus, device, dtype, engine, isolate, "),
        (["roofline.bandwidth_gbs=0"], r"^roofline\.bandwidth_gbs: must be > 0\.0, got 0$"),
        (["roofline.tflops=0"], r"^roofline\.tflops: must be > 0\.0, got 0$"),
        (["model.rope_base=abc"], r"^model\.rope_base: expected a number, got 'abc'$"),
        (["model.norm_eps=0"], r"^model\.norm_eps: must be > 0\.0, got 0$"),
        (["model.tie_embeddings=maybe"], r"^model\.tie_embeddings: expected true or false, got 'maybe'$"),
        (["model.rope_scaling=5"], r"^model\.rope_scaling: expected null or a mapping of factor, low_freq_factor, "),
        (["model=llama-3.2-1b", "model.rope_scaling.factor=-1"], r"^model\.rope_scaling\.factor: must be > 0"),
        (["cache_dir=5"], r"^cache_dir: expected a directory path or null \(the default\), got 5$"),
        # what the model's shape cannot take: refused before any work, not a point that builds and then fails
        (["engine=distilled", "engine.layers_kept=[0,99]"], r"^engine\.layers_kept: indices must be in 0\.\.\d+, "),
        (["engine=quantized", "engine.layers=[nomatch]"], r"^engine\.layers: 'nomatch' matches no linear layer; "),
        (["engine=pruned", "engine.layers=[atention]"], r"^engine\.layers: 'atention' matches no linear layer; "),
        (["engine=pruned/wanda", "engine.calibration_seq_len=5000"],
         r"^engine\.calibration_seq_len: 5000 exceeds the model's context \(1024\) \(model '\w+'\)$"),
        (["engine=distilled", "model=tiny", "model.weights=trained", "engine.seq_len=5000"],
         r"^engine\.seq_len: 5000 exceeds the teacher's context \(1024\) \(model 'tiny'\)$"),
        (
            ["engine=distilled", "engine.precision=half"],
            r"^engine: invalid parameters for 'distilled': engine\.precision: 'half' is not allowed; allowed: auto, ",
        ),
    ],
)
def test_bad_values_name_the_field(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose_cfg(*overrides))
    assert "\n" not in str(info.value)


def test_tests_never_use_the_users_cache(compose_cfg, _isolated_home):
    """conftest's session HOME: `cache_dir: null` resolves (and is created) under it, not under ~/.cache."""
    import os
    import pwd

    import harness.config

    spec = validate(compose_cfg())
    assert spec.cache_dir == harness.config.DEFAULT_CACHE_DIR == _isolated_home / ".cache" / "llm-inference-harness"
    assert spec.cache_dir.is_dir() and os.environ["HOME"] == str(_isolated_home)
    assert not str(spec.cache_dir).startswith(pwd.getpwuid(os.getuid()).pw_dir + os.sep)


def test_a_cache_dir_that_cannot_take_files_is_refused_before_any_work(compose_cfg, tmp_path):
    """Else every point is measured, then fails writing its peaks or checkpoint there."""
    from harness.config import ConfigError, validate

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"^cache_dir: cannot create '.*file/sub' \(Not a directory\); give a "):
        validate(compose_cfg(f"cache_dir={a_file}/sub"))
    with pytest.raises(ConfigError, match=r"^cache_dir: cannot create '.*file' "):
        validate(compose_cfg(f"cache_dir={a_file}"))
    validate(compose_cfg(f"cache_dir={tmp_path}/new/cache"))  # made on first use
    assert (tmp_path / "new" / "cache").is_dir()


def test_every_top_level_key_of_the_config_tree_is_known(compose_cfg):
    """The unknown-key check refuses typos, never a key the config tree itself uses (or a user's free-text note)."""
    import yaml

    from harness.config import TOP_LEVEL

    used = set(yaml.safe_load((config_dir() / "config.yaml").read_text())) - {"defaults"}
    for path in sorted((config_dir() / "sweep").glob("*.yaml")):
        used |= set(yaml.safe_load(path.read_text())) - {"defaults"}
    assert used <= TOP_LEVEL, sorted(used - TOP_LEVEL)
    assert set(compose_cfg()) <= TOP_LEVEL
    spec = validate(compose_cfg("+note=baseline run", "measure.disable_gc=false", "roofline.bandwidth_gbs=12.5"))
    assert spec.cfg["note"] == "baseline run" and spec.policy.disable_gc is False
    assert spec.roofline.bandwidth_gbs == 12.5 and validate(compose_cfg()).roofline.bandwidth_gbs is None


def test_threads_is_part_of_the_point_only_when_set(compose_cfg):
    from harness.point import identity

    auto, one = validate(compose_cfg()), validate(compose_cfg("threads=1"))
    assert auto.threads is None and one.threads == 1
    assert "threads" not in identity(auto)  # point keys of sweeps that never set it do not change
    assert identity(one)["threads"] == 1


def test_cuda_on_a_machine_without_cuda(compose_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, on a GPU box too
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"^device: '{device}' requested but CUDA is not available"):
            validate(compose_cfg(f"device={device}"))


CLI_CASES = [
    (["engine=nope"], "engine: unknown option 'nope'; allowed: compiled, distilled, eager, fused"),
    (["model=huge"], "model: unknown option 'huge'; allowed: llama-3-8b, llama-3.2-1b, medium, small, tiny"),
    (["workload.batch_size=-1"], "workload.batch_size: must be an integer >= 1, got -1"),
    (["workload.prompt_len=1020", "workload.gen_len=8"], "exceeds model.max_seq_len=1024"),
    (["workload.foo=1"], "workload.foo: unknown field; allowed: batch_size, decoding, gen_len, num_beams, prompt_len"),
    (["workload.batch_size=[1"], "cannot parse override 'workload.batch_size=[1'"),
    (["+isolat=true"], "isolat: unknown field; allowed: cache_dir, corpus, device, dtype, engine, isolate, measure"),
    (["-m", "workload.batch_size=1,-2"], "workload.batch_size: must be an integer >= 1, got -2 (sweep point 2/2"),
    # a group given no option's name: Hydra's ValueError, as one line naming the group
    (["model=null"], "model: expected an option name, got 'null'; allowed: llama-3-8b, llama-3.2-1b, medium"),
    (["-m", "model=tiny,null"], "model: expected an option name, got 'null'; allowed: llama-3-8b"),
    # an unknown field lists the fields of the option the command chose, not of the default
    (["engine=pruned", "engine.methd=wanda"], "engine.methd: unknown field; allowed: calibration_seed, "),
    (["-m", "engine=pruned", "engine.methd=wanda"], "engine.methd: unknown field; allowed: calibration_seed, "),
    (["model.dim=${oops}"], "Interpolation key 'oops' not found"),
    (["--shell-completion"], "--shell-completion: Expecting one subcommand"),
]


@pytest.mark.parametrize("args,message", CLI_CASES)
def test_cli_errors_are_one_line_exit_2_and_do_no_work(run_harness, tmp_path, capsys, args, message):
    code = run_harness("run", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("harness run: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("field,mode", [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m"])])
def test_an_output_dir_that_cannot_be_made_is_one_line(run_harness, tmp_path, capsys, field, mode):
    a_file = tmp_path / "file"
    a_file.write_text("")
    code = run_harness("run", *mode, "model=tiny", "measure=quick", f"{field}={a_file}/out")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"harness run: error: {field}: cannot create '{a_file}/out' (Not a directory)"), err


def test_console_script_exit_code_and_no_traceback(tmp_path, subprocess_env):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "workload.batch_size=0", f"hydra.run.dir={tmp_path}/r"],
        capture_output=True,
        text=True,
        env=subprocess_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "harness run: error: workload.batch_size: must be an integer >= 1, got 0"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (config_dir() / "sweep").glob("*.yaml")))
def test_every_point_of_every_sweep_preset_is_valid(compose_cfg, preset):
    """Each named sweep composes, and every point of its grid validates (GPU presets with the device set to cpu,
    so that a typo in an engine or model name fails here rather than on a GPU machine)."""
    import itertools

    import yaml

    text = yaml.safe_load((config_dir() / "sweep" / f"{preset}.yaml").read_text())
    params = {k: str(v).split(",") for k, v in text["hydra"]["sweeper"]["params"].items()}
    assert params, f"+sweep={preset} sweeps nothing"
    cpu = ["device=cpu"] if str(text.get("device", "auto")).startswith("cuda") else []
    for values in itertools.product(*params.values()):
        point = [f"{k}={v}" for k, v in zip(params, values, strict=True)]
        spec = validate(compose_cfg(f"+sweep={preset}", *cpu, *point))
        assert spec.engine.name in {v.split("/")[0] for v in params.get("engine", [spec.engine.name])}


def test_train_seq_len_must_fit_the_trained_models_context(compose_cfg):
    with pytest.raises(
        ConfigError,
        match=r"^train\.seq_len: 2000 exceeds model\.max_seq_len=1024 of model 'tiny'; "
        r"allowed: 1\.\.1024$",
    ) as info:
        validate(compose_cfg("train.seq_len=2000"))
    assert "\n" not in str(info.value)
    assert validate(compose_cfg("train.seq_len=1024")).train.seq_len == 1024
    # random weights never train: train.seq_len does not matter there
    assert validate(compose_cfg("model.weights=random", "train.seq_len=2000")).train.seq_len == 2000


def test_harness_train_refuses_a_seq_len_beyond_the_context_before_any_work(run_harness, capsys, tmp_path):
    code = run_harness("train", "model=tiny", "train.seq_len=2000", f"cache_dir={tmp_path}/cache")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("harness train: error: train.seq_len: 2000 exceeds"), err
    assert not (tmp_path / "cache").exists()


def test_profile_cache_must_fit_the_context(compose_cfg):
    small = ["model.weights=random", "quality.enabled=false", "model.max_seq_len=32", "workload.prompt_len=28",
             "workload.gen_len=2"]  # fmt: skip
    message = (
        r"^profile_steps: workload\.prompt_len \+ profile_steps \+ 1 = 28 \+ 8 \+ 1 = 37 exceeds "
        r"model\.max_seq_len=32 of model 'tiny'; allowed: 1\.\.3 with workload\.prompt_len=28$"
    )
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose_cfg(*small, "profile=true"))
    assert "\n" not in str(info.value)
    assert validate(compose_cfg(*small, "profile=true", "profile_steps=3")).profile.steps == 3
    assert not validate(compose_cfg(*small)).profile.enabled  # without profiling the workload alone must fit


def test_unknown_train_field_does_not_list_seed(compose_cfg):
    with pytest.raises(ConfigError, match=r"^train\.foo: unknown field; allowed: ") as info:
        validate(compose_cfg("+train.foo=1"))
    allowed = str(info.value).split("allowed: ", 1)[1].split(", ")
    assert "seed" not in allowed and "seq_len" in allowed and "steps" in allowed
    with pytest.raises(ConfigError, match=r"^train\.seed: training uses the top-level seed; set seed=<int> instead$"):
        validate(compose_cfg("+train.seed=1"))


def test_a_corpus_too_small_is_refused_up_front_for_random_weights_too(compose_cfg, tmp_path):
    """Every point loads the corpus it names (calibration, quality): refused before any work, not by each point of
    a sweep at set-up."""
    small = tmp_path / "small.txt"
    small.write_bytes(b"twelve bytes")
    with pytest.raises(ConfigError, match=r"^corpus\.path: .*small\.txt.* has 12 bytes; at least 65536"):
        validate(compose_cfg("model.weights=random", "quality.enabled=false", f"corpus.path={small}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vocab_size=1", "model.vocab_size: must be an integer >= 2, got 1"),
        ("model.max_seq_len=100000000", "model.max_seq_len: must be an integer in 1..1048576, got 100000000"),
    ],
)
def test_shapes_that_cannot_run_are_refused_naming_the_field(compose_cfg, override, message):
    """A one-token vocabulary leaves prompts nothing to draw; 10^8 positions of rotary tables take tens of GB."""
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.") + "$"):
        validate(compose_cfg("model.weights=random", "quality.enabled=false", override))


def test_a_relative_corpus_path_is_written_back_resolved(compose_cfg, tmp_path, monkeypatch):
    """Like cache_dir: the validated config holds the resolved corpus.path, so a process that validates it again
    from another directory (an isolated child in its job folder under hydra.job.chdir=true) reads the same file."""
    from hydra.core.hydra_config import HydraConfig

    from harness.corpus import load_corpus

    # no job runs here (an in-process run before this test leaves Hydra's runtime config of its own launch)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    (tmp_path / "corp.txt").write_bytes(load_corpus().train[: 20 * 4096])
    monkeypatch.chdir(tmp_path)
    spec = validate(compose_cfg("corpus.path=corp.txt", "cache_dir=cache"))
    assert spec.cfg["corpus"] == {"path": str(tmp_path / "corp.txt"), "heldout_every": 20}
    assert spec.corpus.path == str(tmp_path / "corp.txt") and spec.cfg["cache_dir"] == str(tmp_path / "cache")
    job = tmp_path / "job"
    job.mkdir()
    monkeypatch.chdir(job)
    assert validate(spec.cfg).corpus.path == str(tmp_path / "corp.txt")  # what the child does, from its job folder
