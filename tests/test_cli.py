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


def _env_value(out: str, key: str) -> str:
    """The value printed for ``key`` by `harness env` (``key<padding>  value``)."""
    rows = [line for line in out.splitlines() if line.startswith(key + " ")]
    assert len(rows) == 1, out
    return rows[0][len(key) :].strip()


def test_env_prints_device_threads_versions_and_git(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("device", "torch threads", "version.torch", "git", "fingerprint", "cpu"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    assert _env_value(out, "torch threads") == str(torch.get_num_threads())
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:  # the current count, not a number that happens to be printed elsewhere (the CPU count, a version)
        torch.set_num_threads(other)
        assert main(["env", "--no-peaks"]) == 0
        assert _env_value(capsys.readouterr().out, "torch threads") == str(other)
    finally:
        torch.set_num_threads(before)


def test_env_json_is_the_record_fingerprint(capsys):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp["device_type"] == "cpu" and fp["versions"]["torch"].startswith("2.13.0") and len(fp["id"]) == 12


def test_env_bad_device(capsys):
    assert main(["env", "--device", "gpu7"]) == 2
    assert "device: 'gpu7' is not a device" in capsys.readouterr().err
