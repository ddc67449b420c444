"""`harness compare`: exit codes, the terminal table, Markdown and JSON summaries, bad and incomplete input, and
the example workflow's commands."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from gate_points import point_samples, write_side

from harness.records import RECORD_NAME

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def two_sweeps(tmp_path, synthetic_point):
    base = [point_samples(2.0, batch_size=b) for b in (1, 2, 4)]
    cand = [point_samples(2.0 if b != 4 else 2.4, batch_size=b, seed_data=1) for b in (1, 2, 4)]
    write_side(tmp_path, "base", synthetic_point, base)
    write_side(tmp_path, "cand", synthetic_point, cand)
    return tmp_path / "base", tmp_path / "cand"


def test_cli_exit_codes_table_markdown_and_json(run_harness, two_sweeps, tmp_path, capsys, monkeypatch):
    base, cand = two_sweeps
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code = run_harness("compare", str(base), str(cand), "--json", str(tmp_path / "gate.json"))
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("REGRESSION: 1 of 3 points regressed")
    assert "regression  eager · tiny · b4  tpot_ms" in out
    md = summary.read_text()
    assert md.startswith("## ❌ LLM inference gate: REGRESSION: 1 of 3 points regressed")
    assert "| ❌ regression | eager · tiny · b4 | tpot_ms |" in md and "<details><summary>" in md
    doc = json.loads((tmp_path / "gate.json").read_text())
    assert doc["verdict"] == "regression" and doc["exit_code"] == 1 and doc["counts"]["regression"] == 1
    reg = [r for r in doc["rows"] if r["verdict"] == "regression"]
    assert reg[0]["metric"] == "tpot_ms" and 0.15 < reg[0]["change"] < 0.25 and reg[0]["p_value"] < 0.01

    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    code = run_harness(
        "compare", str(base), str(cand), "--metric", "tpot_ms:0.25", "--markdown", str(tmp_path / "g.md")
    )
    assert code == 0 and "no regression" in capsys.readouterr().out
    assert "tpot_ms 25.0%" in (tmp_path / "g.md").read_text()
    assert run_harness("compare", str(base), str(base), "--json", "-") == 0
    assert json.loads(capsys.readouterr().out)["counts"]["no change"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "{cand}"], "BASE: {tmp}/missing: no such file or directory"),
        (["{tmp}/empty", "{cand}"], "BASE: {tmp}/empty: no record.json found"),
        (["{base}", "{tmp}/other"], "no point in common (3 in BASE, 1 in CAND"),
        (["{base}", "{cand}", "--metric", "tpot"], "unknown metric 'tpot'; allowed: ttft_ms"),
        (["{base}", "{cand}", "--threshold", "-0.1"], "--threshold: must be a finite number >= 0"),
        (["{base}", "{cand}", "--thresholds", "{tmp}/nope.yaml"], "cannot read thresholds file"),
        (["{base}", "{cand}", "--alpha", "2"], "--alpha: must be within (0, 1)"),
        (["{base}"], "the following arguments are required: CAND"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    run_harness, two_sweeps, tmp_path, synthetic_point, capsys, args, message
):
    base, cand = two_sweeps
    (tmp_path / "empty").mkdir()
    synthetic_point(tmp_path / "other" / "0", **point_samples(2.0, batch_size=64))
    fill = lambda s: s.format(tmp=tmp_path, base=base, cand=cand)
    assert run_harness("compare", *map(fill, args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness compare: error: ") and fill(message) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_corrupted_record_is_named_and_the_rest_compared(run_harness, two_sweeps, tmp_path, capsys):
    base, cand = two_sweeps
    bad = cand / "2" / RECORD_NAME
    bad.write_text(bad.read_text()[:200])
    code = run_harness("compare", str(base), str(cand), "--markdown", str(tmp_path / "g.md"))
    captured = capsys.readouterr()
    assert code == 2  # the regressed point is unreadable: the rest is compared, but the gate cannot pass
    assert f"harness compare: warning: CAND: {bad}: unreadable record" in captured.err
    assert "only in BASE (not in CAND): eager · tiny · b4" in captured.out
    assert f"unreadable: CAND: {bad}" in captured.out
    assert "## ⚠️ LLM inference gate: no regression" in (tmp_path / "g.md").read_text()
    assert "2 no change" in captured.out.strip().splitlines()[-2]
    assert captured.out.strip().splitlines()[-1].startswith("incomplete: 1 record(s) could not be read")


def test_cli_help_lists_verdicts_and_exit_codes(run_harness, capsys):
    assert run_harness("compare", "--help") == 0
    out = capsys.readouterr().out
    assert "exit status: 0 no regression, 1 regression, 2 usage or input error" in out and "--thresholds" in out
    assert run_harness("--help") == 0
    assert "compare BASE CAND" in capsys.readouterr().out


def test_the_workflow_example_runs_real_commands(compose_cfg):
    """examples/github-actions.yml: the sweep composes, and every harness command in it parses."""
    from harness.gate_cli import compare_parser, export_parser

    wf = yaml.safe_load((REPO / "examples" / "github-actions.yml").read_text())
    assert set(wf[True]) == {"push", "pull_request"}  # YAML reads the key `on` as True
    jobs = wf["jobs"]
    steps = [s for job in jobs.values() for s in job["steps"]]
    lines = [line.strip() for s in steps if "run" in s for line in s["run"].splitlines()]
    cmds = {line.split()[1]: shlex.split(line)[2:] for line in lines if line.startswith("harness ")}
    assert {"run", "compare", "export"} <= set(cmds)
    opts = compare_parser().parse_args(cmds["compare"])
    assert str(opts.markdown) == "gate.md" and str(opts.json) == "gate.json"
    assert export_parser().parse_args(cmds["export"]).format == "pytest-benchmark"
    cfg = compose_cfg(*shlex.split(wf["env"]["SWEEP"]))
    assert cfg.device == "cuda" and cfg.measure.name == "default"
    uses = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    assert {"actions/cache/save", "actions/cache/restore"} <= set(uses)
    assert uses["benchmark-action/github-action-benchmark"]["with"]["tool"] == "pytest"
    # the token writes the repository only where it must: the job that pushes gh-pages, on pushes to main
    assert wf["permissions"]["contents"] == "read"
    pushing = [n for n, j in jobs.items() if any(s.get("with", {}).get("auto-push") for s in j["steps"])]
    assert pushing == ["chart"] and jobs["chart"]["permissions"] == {"contents": "write"}
    assert "github.event_name == 'push'" in jobs["chart"]["if"] and "refs/heads/main" in jobs["chart"]["if"]
    assert all(j.get("permissions", wf["permissions"])["contents"] == "read" for n, j in jobs.items() if n != "chart")
    upload = next(s for s in jobs["gate"]["steps"] if s.get("with", {}).get("path") == "bench.json")
    download = next(s for s in jobs["chart"]["steps"] if s.get("uses", "").startswith("actions/download-artifact"))
    assert download["with"]["name"] == upload["with"]["name"] and jobs["chart"]["needs"] == "gate"


def test_cli_a_sweep_killed_part_way_cannot_pass(run_harness, two_sweeps, tmp_path, capsys):
    """A point sweep.json planned but that never wrote a record (a sweep killed by CI's timeout) is an error:
    the gate exits 2 rather than "no regression" for the points it did not see, read directly or exported."""
    from harness.progress import write_sweep_meta
    from harness.records import read_record

    base, cand = two_sweeps
    keys = [read_record(cand / str(i) / RECORD_NAME)["point_key"] for i in range(3)]
    plan = {"total": 3, "points": [[f"workload.batch_size={b}"] for b in (1, 2, 4)], "point_keys": keys}
    write_sweep_meta(cand, plan)
    (cand / "2" / RECORD_NAME).unlink()  # the regressed point never finished
    assert run_harness("compare", str(base), str(cand)) == 2
    captured = capsys.readouterr()
    assert "job 2 (workload.batch_size=4) planned in sweep.json has no record" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("incomplete: 1 record(s) could not be read")

    table = tmp_path / "cand.json"
    assert run_harness("export", str(cand), "--format", "json", "-o", str(table)) == 0
    assert "planned in sweep.json has no record" in capsys.readouterr().err
    assert run_harness("compare", str(base), str(table)) == 2  # the exported table keeps its errors
    assert "job 2 (workload.batch_size=4)" in capsys.readouterr().err

    import shutil

    shutil.copytree(cand, tmp_path / "results" / "sweeps" / "cand")  # a results root holding the sweep
    assert run_harness("compare", str(base), str(tmp_path / "results")) == 2
    assert f"{tmp_path / 'results' / 'sweeps' / 'cand'}: job 2" in capsys.readouterr().err

    # a planned point whose record is there but cut short: one error (unreadable), not a second "no record"
    (cand / "2" / RECORD_NAME).write_text('{"schema_version": 1, "point_')
    assert run_harness("compare", str(base), str(cand)) == 2
    captured = capsys.readouterr()
    assert "unreadable record" in captured.err and "planned in sweep.json has no record" not in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("incomplete: 1 record(s) could not be read")


def test_cli_a_record_whose_schema_version_is_not_an_integer_is_named(run_harness, two_sweeps, capsys):
    """It is named and skipped, never a traceback (exit 1 would read as a regression)."""
    from harness.records import RecordError, read_record

    base, cand = two_sweeps
    path = cand / "2" / RECORD_NAME  # the regressed point: without it nothing regresses, and the gate cannot pass
    path.write_text(path.read_text().replace('"schema_version": 1', '"schema_version": "1"'))
    with pytest.raises(RecordError, match="schema_version must be an integer, got '1'"):
        read_record(path)
    assert run_harness("compare", str(base), str(cand)) == 2
    assert "schema_version must be an integer" in capsys.readouterr().err


def test_the_workflow_fails_loudly_when_a_pull_request_finds_no_baseline():
    """An evicted or expired cache must not skip the gate and leave the pull request green."""
    wf = yaml.safe_load((REPO / "examples" / "github-actions.yml").read_text())
    steps = wf["jobs"]["gate"]["steps"]
    names = [s.get("name") for s in steps]
    guard = steps[names.index("Require a baseline")]
    assert "pull_request" in guard["if"] and "steps.baseline.outputs.cache-matched-key == ''" in guard["if"]
    assert "::error" in guard["run"] and guard["run"].rstrip().endswith("exit 1")
    assert names.index("Restore main's baseline") < names.index("Require a baseline") < names.index("CI sweep")
    gate = steps[names.index("Gate")]
    assert "cache-matched-key" in gate["run"] and "GITHUB_STEP_SUMMARY" in gate["run"]  # which baseline was used


def test_cli_help_names_exit_3_and_the_new_flags(run_harness, capsys):
    assert run_harness("compare", "--help") == 0
    out = capsys.readouterr().out
    assert "3 nothing gated" in out and "--allow-ungated" in out and "--history DB" in out
