"""The console script's commands other than run: help, env, unknown commands."""

from __future__ import annotations

import json

import torch

from harness.cli import COMMANDS, main


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run [hydra args...]" in out and "env [--json]" in out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"harness frobnicate: error: unknown command 'frobnicate'; allowed: {', '.join(COMMANDS)}"
    assert list(COMMANDS)[:2] == ["run", "env"] and "report" in COMMANDS


def test_env_prints_device_threads_versions_and_git(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("device", "torch threads", "version.torch", "git", "fingerprint", "cpu"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    assert f"{torch.get_num_threads()}" in out


def test_env_json_is_the_record_fingerprint(capsys):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp["device_type"] == "cpu" and fp["versions"]["torch"].startswith("2.13.0") and len(fp["id"]) == 12


def test_env_bad_device(capsys):
    assert main(["env", "--device", "gpu7"]) == 2
    assert "device: 'gpu7' is not a device" in capsys.readouterr().err
