"""`harness` console script: `run` (the Hydra app), `env`, `train`, `report`, `compare` (the CI gate), `export`,
`history` (the history database) and `dashboard` (the site over history).

Bad input never shows a traceback: it prints one line naming the problem and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USAGE = """usage: harness <command> [args]

commands:
  run [hydra args...]   measure one point, or a sweep with -m / +sweep=<name> (Hydra overrides)
  env [--json]          print the device, threads, versions and git SHA this machine would record
  train [overrides...]  train a reference model on the corpus and cache it (model.weights=trained does it on use)
  report DIR [-o FILE]  write the comparative HTML report of a sweep (default: DIR/report.html)
  compare BASE CAND     CI gate: verdict per point and metric; exit 0 no regression, 1 regression, 2 bad input
  export DIR --format F write pytest-benchmark JSON, csv, parquet or json (the table with raw samples)
  history add DIR...    store sweeps in the history database (results/history.sqlite); history list shows them
  dashboard [DIR...]    write the dashboard over history (storing the sweeps under DIR first): trends, steps

examples:
  harness run                                       # one default point (eager, tiny, batch 1)
  harness run +sweep=demo                           # the demo sweep
  harness run -m engine=eager model=tiny workload.batch_size=1,4 measure=quick
  harness run --cfg job                             # print the composed config
  harness report results/sweeps/<timestamp>         # rebuild a sweep's report.html
  harness compare results/main results/pr --markdown gate.md   # gate a PR's sweep against main's
  harness export results/sweeps/<timestamp> --format pytest-benchmark
  harness history add results/sweeps/*              # append sweeps to the history (re-adding changes nothing)
  harness dashboard -o results/dashboard            # the static site over history (index.html)
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Invalid user input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing its usage block."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def format_hydra_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra's multi-line composition errors as one line naming the field and what is allowed (the fields of
    the config groups that ``overrides`` choose: ``engine=pruned engine.methd=x`` lists pruned's)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, OverrideParseException):
        first = re.split(r"\s*See https://", text)[0]
        return f"cannot parse override {exc.override!r}: {_one_line(first)} (expected key=value; see --help)"
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = ", ".join(_options(group, overrides) or exc.options or []) or "(none)"
        return f"{group}: unknown option {name!r}; allowed: {options}"
    cause = str(exc.__cause__ or "")
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in cause:
        key = m.group(1)
        parent = key.rpartition(".")[0]
        allowed = _allowed_keys(parent, overrides)
        return f"{key}: unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if m:
        return f"{m.group(1)}: already set by the config; override it without the leading +"
    m = re.search(r"Multiple values for (\S+?)\.? To override a value use 'override \S+: (\S+)'", text)
    if m:  # `+model=small`: the config already chooses a model
        return f"{m.group(1)}: already chosen by the config; use {m.group(1)}={m.group(2)} (without the leading +)"
    return _one_line(f"{text} {cause}")


# Hydra's ValueError for a config group given a value that is no option's name (model=null, engine=7)
GROUP_VALUE_ERROR = "Config group override must be a string or a list"


def user_config_dirs(args: Sequence[str]) -> list[Path]:
    """The directories ``--config-dir DIR`` / ``-cd DIR`` add to the config search path."""
    dirs, it = [], iter(args)
    for a in it:
        value = next(it, None) if a in ("--config-dir", "-cd") else a.partition("=")[2] if a.startswith(
            "--config-dir=") else None  # fmt: skip
        if value:
            dirs.append(Path(value).expanduser())
    return dirs


def _search_dirs(args: Sequence[str]) -> list[Path]:
    from harness.paths import config_dir

    return [*user_config_dirs(args), Path(config_dir())]


def _options(group: str, args: Sequence[str]) -> list[str]:
    """Option names of config group ``group`` (a folder such as ``model`` or ``engine/quantized``) over the search
    path: the shipped configs and the user's --config-dir."""
    return sorted({p.stem for d in _search_dirs(args) if (d / group).is_dir() for p in (d / group).glob("*.yaml")})


def format_group_value_error(args: Sequence[str], exc: BaseException) -> str:
    """``model=null``: one line naming the group and its options, instead of Hydra's ValueError."""
    for arg in args:
        key, eq, value = str(arg).partition("=")
        key = key.lstrip("+~")
        options = _options(key, args) if eq and key else []
        bad = [v for v in value.split(",") if v not in options]
        if options and bad:
            return f"{key}: expected an option name, got {bad[0]!r}; allowed: {', '.join(options)}"
    return _one_line(str(exc))


def composition_error(exc: BaseException, overrides: Sequence[str] = ()) -> str | None:
    """One line for an error raised while composing a config: Hydra's or OmegaConf's own, or the ValueError Hydra
    raises for a group given no option's name (``model=null``). None for any other exception."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, HydraException | OmegaConfBaseException):
        return format_hydra_error(exc, overrides)
    if isinstance(exc, ValueError) and GROUP_VALUE_ERROR in str(exc):
        return format_group_value_error(overrides, exc)
    return None


def _allowed_keys(parent: str, overrides: Sequence[str] = ()) -> list[str]:
    """Keys of a config node with the config groups ``overrides`` choose (a sweep's first option), for error
    messages (empty when it cannot be composed). Only config groups count as choices: a mistyped top-level key
    (``devcie=cpu``) is what is being explained, not a group to compose."""
    from omegaconf import OmegaConf

    choices = []
    for o in overrides:
        key, eq, value = str(o).partition("=")
        if eq and key and "." not in key and not key.startswith(("+", "~", "hydra")) and value:
            if _options(key, overrides):
                choices.append(f"{key}={value.split(',')[0]}")
    for attempt in (choices, []):
        try:
            cfg = compose(attempt, user_config_dirs(overrides))
        except Exception:
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = sorted(str(k) for k in node.keys()) if node is not None else []
        return [k for k in keys if k != "hydra"]
    return []


def cmd_run(args: Sequence[str]) -> int:
    """Run the Hydra app with ``args`` as its command line."""
    # Let exceptions reach us instead of Hydra printing a traceback and exiting with 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness import callbacks
    from harness.app import task
    from harness.callbacks import PreflightAbort
    from harness.config import ConfigError

    callbacks.LAST_RESULT.clear()
    _check_hydra_flags(args)
    saved = sys.argv
    sys.argv = ["harness run", *args]
    try:
        task()
    except (ConfigError, PreflightAbort) as exc:
        raise UsageError(str(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(format_hydra_error(exc, args)) from None
    except Exception as exc:  # a launcher gave up mid-sweep: keep what was measured, say what is missing
        if _hydra_flag_error(exc):
            raise UsageError(format_flag_error(args, exc)) from None
        text = composition_error(exc, args)
        if text is not None:
            raise UsageError(text) from None
        if "Expecting one subcommand from" in str(exc):  # Hydra's --shell-completion without what to do
            example = "(e.g. --shell-completion install=bash)"
            raise UsageError(f"--shell-completion: {_one_line(str(exc))} {example}") from None
        if not callbacks.finish_aborted(exc):  # a launcher that started no job: UsageError, no record written
            if _before_any_job(exc):  # Hydra refused the command line itself (a null hydra.sweeper.params)
                raise UsageError(_hydra_internal_error(exc)) from None
            raise
        isolated = callbacks.LAST_RESULT.get("isolated")
        hint = "" if isolated else " (isolate=true keeps a crashed point from stopping the others)"
        sys.stderr.write(
            f"harness run: error: the launcher stopped the sweep: {_one_line(f'{type(exc).__name__}: {exc}')}{hint}\n"
        )
        return EXIT_FAILED
    finally:
        sys.argv = saved
    return EXIT_FAILED if callbacks.LAST_RESULT.get("all_failed") else EXIT_OK


def _before_any_job(exc: BaseException) -> bool:
    """Whether ``exc`` came out of Hydra's own set-up (composing the primary config, reading --experimental-rerun)
    with no frame of the harness's code in between: nothing ran, so it is the command line that is wrong."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(Path(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    ours = Path(__file__).parent
    return not any(ours in f.parents for f in frames[1:]) and any("hydra" in f.parts for f in frames)


def _hydra_internal_error(exc: BaseException) -> str:
    text = _one_line(f"{type(exc).__name__}: {exc}")
    if "Unexpected type for root: NoneType" in text or "'NoneType' object has no attribute" in text:
        return (f"hydra.sweeper.params: not set in this config, so its keys cannot be overridden ({text}); "
                "sweep with -m key=a,b or a +sweep=<name> preset")  # fmt: skip
    return f"{text} (raised by Hydra before any point ran)"


def _check_hydra_flags(args: Sequence[str]) -> None:
    """Hydra's own flags parsed up front, so that a bad one (``--cfg bogus``) is one line, not argparse's usage
    block. Flags that print and exit (help, version) are left to Hydra."""
    if any(a in ("-h", "--help", "--hydra-help", "--version") for a in args):
        return
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args(list(args))


def _hydra_flag_error(exc: BaseException) -> bool:
    """Whether ``exc`` is Hydra refusing its own command-line flags (``-m`` with ``--cfg``, ``--resolve`` alone):
    a ValueError raised by Hydra's argument handling itself, before any job ran."""
    if not isinstance(exc, ValueError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    return Path(code.co_filename).parent.name == "_internal" and code.co_name == "_run_hydra"


def format_flag_error(args: Sequence[str], exc: BaseException) -> str:
    """Hydra's refusal of a combination of its flags as one line naming the flags given and what is allowed."""
    text = _one_line(str(exc))
    if text.startswith("Only one of"):
        given = _hydra_commands(args)
        named = " and ".join(given) if len(given) > 1 else "these flags"
        return (
            f"{named}: only one of --run, -m/--multirun, --cfg, --info and --shell-completion can be given "
            "(to print a point's config: `harness run --cfg job [overrides]`, without -m)"
        )
    if "--resolve" in text:
        return "--resolve: only allowed with --cfg or --help (e.g. `harness run --cfg job --resolve`)"
    return text


def _hydra_commands(args: Sequence[str]) -> list[str]:
    """The mutually exclusive Hydra flags among ``args``, as the user spelled them."""
    try:
        from hydra._internal.utils import get_args_parser

        parsed = get_args_parser().parse_known_args(list(args))[0]
    except (Exception, SystemExit):
        return []
    flags = [
        ("--run", parsed.run),
        ("-m/--multirun", parsed.multirun),
        (f"--cfg {parsed.cfg}", parsed.cfg is not None),
        (f"--info {parsed.info}".rstrip(), parsed.info is not None),
        ("--shell-completion", parsed.shell_completion),
    ]
    return [name for name, on in flags if on]


def cmd_env(args: Sequence[str]) -> int:
    parser = OneLineParser(prog="harness env", description="Print the environment a record would carry.")
    parser.add_argument("--json", action="store_true", help="print the full fingerprint as JSON")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", help="dtype of the matmul peak: auto | fp32 | bf16 | fp16")
    parser.add_argument("--no-peaks", action="store_true", help="skip the roofline peaks (bandwidth, FLOP/s)")
    parser.add_argument("--remeasure", action="store_true", help="measure the peaks again instead of using the cache")
    parser.add_argument("--cache-dir", default=None, help="where peaks are cached (default: the run's cache_dir)")
    opts = parser.parse_args(args)

    import logging

    from harness.config import DEFAULT_CACHE_DIR, ConfigError, resolve_device, resolve_dtype, writable_dir
    from harness.env import fingerprint
    from harness.roofline import device_peaks

    cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else DEFAULT_CACHE_DIR
    try:
        device = resolve_device(opts.device)
        dtype = resolve_dtype(opts.dtype, device)
        if not opts.no_peaks:
            writable_dir(cache, "--cache-dir")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    fp = fingerprint(device)
    if not opts.no_peaks:
        fp["peaks"] = device_peaks(device, dtype, fp["id"], cache, {}, remeasure=opts.remeasure)
    if opts.json:
        print(json.dumps(fp, indent=2, default=str))
        return EXIT_OK
    git = fp["git"]
    lines = [
        ("device", f"{fp['device_type']}: {fp['device_name']}"),
        ("cpu", f"{fp['cpu_model']} ({fp['cpu_count_logical']} logical, {fp['cpu_affinity']} usable)"),
        ("torch threads", fp["torch_threads"]),
        ("huge pages", _huge_pages_line(fp.get("huge_pages"))),
        ("memory", f"{fp['memory_gb']} GB"),
        ("python", fp["python"]),
        ("platform", fp["platform"]),
        (
            "git",
            f"{git['sha']}{' (dirty)' if git['dirty'] else ''} in {git['repo']}"
            if git["sha"]
            else "not a git checkout",
        ),
        ("fingerprint", fp["id"]),
    ]
    if "peaks" in fp:
        pk = fp["peaks"]
        lines += [
            ("copy bandwidth", f"{pk['bandwidth_gbs']:.1f} GB/s (read + write, {pk['buffer_bytes'] / 2**20:.0f} MiB "
                               f"buffers; last-level cache {(pk.get('llc_bytes') or 0) / 2**20:.0f} MiB)"),
            ("matmul", f"{pk['flops'] / 1e9:.1f} GFLOP/s {pk['dtype']} ({pk['matmul_n']}x{pk['matmul_n']})"),
            ("peaks cache", pk["cache"]),
        ]  # fmt: skip
    for key, value in fp.get("cuda", {}).items():
        lines.append((f"cuda.{key}", value))
    lines += [(f"version.{k}", v or "not installed") for k, v in fp["versions"].items()]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


def compose(overrides: Sequence[str], extra_dirs: Sequence[Path] = ()):
    """The job config for ``overrides`` composed from the config tree (and ``extra_dirs``, as --config-dir adds
    them), without running a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.paths import config_dir

    search = [f"hydra.searchpath=[{','.join(f'file://{Path(d).resolve()}' for d in extra_dirs)}]"] if extra_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[*search, *overrides])
    finally:
        GlobalHydra.instance().clear()


def cmd_train(args: Sequence[str]) -> int:
    parser = OneLineParser(
        prog="harness train",
        description="Train a reference model on the corpus and cache its checkpoint (e.g. `harness train model=tiny`).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., train.steps=..., corpus.path=...")
    parser.add_argument("--force", action="store_true", help="train again even when the checkpoint is cached")
    parser.add_argument("--config-dir", "-cd", action="append", default=[], type=Path, metavar="DIR",
                        help="also read config groups (model/*.yaml ...) from DIR, as `harness run` does")  # fmt: skip
    if any(a in ("-m", "--multirun") for a in args):
        raise UsageError("-m/--multirun: `harness train` trains one model per call (e.g. `harness train model=small`); "
                         "`harness run -m` trains what its points need")  # fmt: skip
    opts = parser.parse_args(args)

    import logging

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import ConfigError, check_train_fits, validate
    from harness.corpus import CorpusError, load_corpus
    from harness.training import ensure_trained

    try:
        for d in opts.config_dir:
            if not d.expanduser().is_dir():
                raise UsageError(f"--config-dir: {str(d)!r} is not a directory")
        spec = validate(compose(opts.overrides, [d.expanduser() for d in opts.config_dir]))
        check_train_fits(spec.model, spec.train)  # `harness train` trains whatever model.weights says
        corpus = load_corpus(spec.corpus.path, spec.corpus.heldout_every)
    except (ConfigError, CorpusError) as exc:
        raise UsageError(str(exc)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        text = composition_error(exc, [*(f"--config-dir={d}" for d in opts.config_dir), *opts.overrides])
        if text is None:
            raise
        raise UsageError(text) from None
    if spec.model.args.vocab_size < 256:
        raise UsageError(f"model.vocab_size: a byte-level corpus needs at least 256, got {spec.model.args.vocab_size}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    ckpt, info = ensure_trained(
        spec.model.name, spec.model.args, corpus, spec.train, spec.seed, spec.device, spec.cache_dir, opts.force
    )
    c = corpus.identity()
    print(
        f"model {spec.model.name}: {spec.model.args.num_params() / 1e6:.2f}M params, {info['steps']} steps of "
        f"{spec.train.batch_size}x{spec.train.seq_len} tokens in {info['train'].get('precision', 'fp32')} on "
        f"{c['name']} ({c['train_bytes']:,} train bytes, "
        f"{c['heldout_bytes']:,} held out)\n"
        f"held-out: {info['heldout_bits_per_byte']:.3f} bits/byte   "
        f"unigram baseline: {info['unigram_bits_per_byte']:.3f} bits/byte   "
        f"untrained: {info['init_heldout_bits_per_byte']:.3f} bits/byte\n"
        f"{'loaded from cache, ' if info['cached'] else ''}trained in {info['seconds']:.0f} s on {info['device']}; "
        f"checkpoint: {ckpt}"
    )
    return EXIT_OK


def cmd_report(args: Sequence[str]) -> int:
    from harness.report.cli import main as report_main  # lazy: plotly is imported only when a report is built

    return report_main(args)


def cmd_compare(args: Sequence[str]) -> int:
    from harness.gate_cli import compare_main  # lazy: scipy's tests load only when gating

    return compare_main(args)


def cmd_export(args: Sequence[str]) -> int:
    from harness.gate_cli import export_main

    return export_main(args)


def cmd_history(args: Sequence[str]) -> int:
    from harness.dashboard.cli import history_main

    return history_main(args)


def cmd_dashboard(args: Sequence[str]) -> int:
    from harness.dashboard.cli import dashboard_main

    return dashboard_main(args)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": cmd_run,
    "env": cmd_env,
    "train": cmd_train,
    "report": cmd_report,
    "compare": cmd_compare,
    "export": cmd_export,
    "history": cmd_history,
    "dashboard": cmd_dashboard,
}


def _huge_pages_line(hp: dict | None) -> str:
    if not hp:
        return "n/a (not a CPU device)"
    state = {True: "in use", False: "not in use", None: "unknown"}[hp.get("in_use")]
    return f"{state} for tensors (THP {hp.get('system')}, THP_MEM_ALLOC_ENABLE={hp.get('torch_alloc')})"


def main(argv: Sequence[str] | None = None) -> int:
    from harness.env import enable_huge_pages

    enable_huge_pages()  # before any model is built: PyTorch reads it at its first large allocation
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)  # asked for: stdout; a missing command: an error
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    try:
        if command is None:
            raise UsageError(f"unknown command {name!r}; allowed: {', '.join(COMMANDS)}")
        return command(rest)
    except UsageError as exc:
        sys.stderr.write(f"harness {name}: error: {_one_line(str(exc))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("harness: interrupted\n")
        return 130
    except BrokenPipeError:  # `harness env | head`: the reader left; say nothing more to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as a shell reports SIGPIPE
