"""`harness` console script: `run` (the Hydra app), `env`, `train`, `report`, `compare` (the CI gate), `export`,
`history` (the history database) and `dashboard` (the site over history).

Bad input never shows a traceback: it prints one line naming the problem and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.hydra_errors import (
    before_any_job,
    choose_one,
    compose,
    composition_error,
    format_flag_error,
    format_hydra_error,
    hydra_flag_error,
    hydra_internal_error,
    one_line,
)

USAGE = """usage: harness <command> [args]

commands:
  run [hydra args...]   measure one point, or a sweep with -m / +sweep=<name> (Hydra overrides)
  env [--json]          print the device, threads, versions and git SHA this machine would record
  train [overrides...]  train a reference model on the corpus and cache it (model.weights=trained does it on use)
  report DIR [-o FILE]  write the comparative HTML report of a sweep (default: DIR/report.html)
  compare BASE CAND     CI gate per point and metric: exit 0 no regression, 1 regression, 2 bad input, 3 nothing gated
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
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143: as a shell reports them


class UsageError(Exception):
    """Invalid user input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing its usage block."""

    def error(self, message: str) -> None:
        raise UsageError(message)


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
    callbacks.OUTPUT.clear()  # an interruption before this run's folder is known names none
    _check_hydra_flags(args)
    _refuse_group_lists(args)
    saved = sys.argv
    sys.argv = ["harness run", *args]
    try:
        task()
    except (ConfigError, PreflightAbort) as exc:
        raise UsageError(str(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(format_hydra_error(exc, args)) from None
    except Exception as exc:  # a launcher gave up mid-sweep: keep what was measured, say what is missing
        if hydra_flag_error(exc):
            raise UsageError(format_flag_error(args, exc)) from None
        text = composition_error(exc, args)
        if text is not None:
            raise UsageError(text) from None
        if "Expecting one subcommand from" in str(exc):  # Hydra's --shell-completion without what to do
            example = "(e.g. --shell-completion install=bash)"
            raise UsageError(f"--shell-completion: {one_line(str(exc))} {example}") from None
        if not callbacks.finish_aborted(exc):  # a launcher that started no job: UsageError, no record written
            if before_any_job(exc):  # Hydra refused the command line itself (a null hydra.sweeper.params)
                raise UsageError(hydra_internal_error(exc)) from None
            raise
        isolated = callbacks.LAST_RESULT.get("isolated")
        hint = "" if isolated else " (isolate=true keeps a crashed point from stopping the others)"
        sys.stderr.write(
            f"harness run: error: the launcher stopped the sweep: {one_line(f'{type(exc).__name__}: {exc}')}{hint}\n"
        )
        return EXIT_FAILED
    finally:
        sys.argv = saved
    return EXIT_FAILED if callbacks.LAST_RESULT.get("all_failed") else EXIT_OK


def _check_hydra_flags(args: Sequence[str]) -> None:
    """Hydra's own flags parsed up front, so that a bad one (``--cfg bogus``) is one line, not argparse's usage
    block. Flags that print and exit (help, version) are left to Hydra."""
    if any(a in ("-h", "--help", "--hydra-help", "--version") for a in args):
        return
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        flag = _flag_after_overrides(args, set(parser._option_string_actions))
        if flag and message.startswith("unrecognized arguments"):
            raise UsageError(f"{flag}: Hydra's flags (-m, --cfg, --config-dir, ...) go before the overrides, e.g. "
                             f"`harness run {flag} key=value ...`; after them, argparse took the rest for "
                             f"{message}")  # fmt: skip
        raise UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    parsed = parser.parse_args(list(args))
    if parsed.package is not None and parsed.cfg is None:
        raise UsageError("-p/--package: only used with --cfg, to print one package of the composed config (e.g. "
                         "`harness run --cfg job -p model`)")  # fmt: skip
    if parsed.package not in (None, "_global_"):
        _check_package(parsed.package, parsed.cfg, parsed.overrides, parsed.config_dir)


def _check_package(package: str, cfg_type: str, overrides: Sequence[str], config_dir: str | None) -> None:
    """``--cfg job -p bogus``: Hydra's own message is a bare line and exit 1; name what ``-p`` can print."""
    from omegaconf import OmegaConf

    from harness.hydra_errors import compose

    try:
        cfg = compose(overrides, [config_dir] if config_dir else (), with_hydra=True)
    except Exception:  # a bad override: Hydra says it, as without -p
        return
    view = {"job": [k for k in cfg if k != "hydra"], "hydra": ["hydra"], "all": list(cfg)}[cfg_type]
    absent = object()
    value = OmegaConf.select(cfg, package, default=absent) if package.split(".")[0] in view else absent
    if value is None:
        raise UsageError(f"-p/--package: {package} is null in the composed config, which Hydra's -p does not print; "
                         f"print its parent instead (-p {package.rpartition('.')[0] or package})")  # fmt: skip
    if value is absent:
        first = cfg[view[0]] if view else None
        example = f" (or a dotted path inside one, e.g. {view[0]}.{next(iter(first))})" if OmegaConf.is_dict(first) \
            and len(first) else ""  # fmt: skip
        raise UsageError(f"-p/--package: {package!r} is not in the composed --cfg {cfg_type} config; allowed: "
                         f"{', '.join(view)}{example}")  # fmt: skip


def _flag_after_overrides(args: Sequence[str], flags: set[str]) -> str | None:
    """The first Hydra flag given after an override (``a=1 -m b=2``): argparse reads no override after it."""
    seen = False
    for arg in args:
        if arg.startswith("-") and arg.partition("=")[0] in flags:
            if seen:
                return arg.partition("=")[0]
        elif "=" in arg:
            seen = True
    return None


def _refuse_group_lists(args: Sequence[str]) -> None:
    """``engine=[eager,pruned]``: Hydra merges every option of the list into one point (the last wins) where the
    user meant two; a group that chooses one option (model, engine, workload, measure) takes a single name."""
    from harness.config import GROUPS

    for arg in args:
        key, eq, value = str(arg).partition("=")
        value = value.strip()
        if eq and key.lstrip("+") in GROUPS and value.startswith("[") and value.endswith("]"):
            names = ",".join(v.strip() for v in value[1:-1].split(","))
            raise UsageError(choose_one(key.lstrip("+"), names))


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
            ("read bandwidth", f"{pk['bandwidth_gbs']:.1f} GB/s (the MBU roof; {pk['buffer_bytes'] / 2**20:.0f} MiB "
                               f"buffers; last-level cache {(pk.get('llc_bytes') or 0) / 2**20:.0f} MiB)"),
            ("copy bandwidth", f"{pk['copy_gbs']:.1f} GB/s (read + write)" if pk.get("copy_gbs") else "not measured"),
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

    from engines.cache import CacheUnreadable
    from harness.config import ConfigError, validate
    from harness.corpus import CorpusError, load_corpus
    from harness.corpus_checks import check_corpus_fits
    from harness.training import ensure_trained

    try:
        for d in opts.config_dir:
            if not d.expanduser().is_dir():
                raise UsageError(f"--config-dir: {str(d)!r} is not a directory")
        spec = validate(compose(opts.overrides, [d.expanduser() for d in opts.config_dir]))
        check_corpus_fits(spec.model, spec.corpus, spec.train)  # `harness train` trains whatever model.weights says
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
    try:
        ckpt, info = ensure_trained(
            spec.model.name, spec.model.args, corpus, spec.train, spec.seed, spec.device, spec.cache_dir, opts.force
        )
    except CacheUnreadable as exc:  # another user's checkpoint, an I/O error: left in place, named in one line
        raise UsageError(str(exc)) from None
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
    taken = _take_sigterm()
    try:
        if command is None:
            raise UsageError(f"unknown command {name!r}; allowed: {', '.join(COMMANDS)}")
        return command(rest)
    except UsageError as exc:
        sys.stderr.write(f"harness {name}: error: {one_line(str(exc))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): the running point recorded it
        return _interrupted(exc)
    except BrokenPipeError:  # `harness env | head`: the reader left; say nothing more to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as a shell reports SIGPIPE
    finally:
        if taken:  # the handler before ours (None: not Python's own, i.e. the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if taken[0] is None else taken[0])


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``timeout(1)``, ``docker stop``, ``scancel``) taken as Ctrl-C: a point's guard
    records the point it stops as interrupted, and the process exits with 143. A KeyboardInterrupt whose text is
    the signal's name, as an isolated point's child raises it."""


def _on_sigterm(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(signal.Signals(signum).name)


def _take_sigterm() -> tuple[object] | None:
    """Handle SIGTERM as an interruption while a command runs; returns the handler to restore (None: not the main
    thread, where Python cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return (signal.signal(signal.SIGTERM, _on_sigterm),)


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Say what stopped the command and where the records so far are (resume=true continues a sweep)."""
    callbacks = sys.modules.get("harness.callbacks")  # imported only by `harness run`
    terminated = isinstance(exc, Terminated)  # the point's guard recorded it as "interrupted (SIGTERM)"
    output = callbacks.OUTPUT if callbacks is not None else {}
    where = ""
    if output.get("sweep"):
        where = f"; records so far in {output['dir']} (add resume=true to the same command to continue the sweep)"
    elif output.get("dir"):
        where = f"; the point's record is in {output['dir']}"
    sys.stderr.write(f"harness: {'terminated (SIGTERM)' if terminated else 'interrupted'}{where}\n")
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
