"""Hydra outside a job, for the command line: composing a config (``compose``), and Hydra's and OmegaConf's
errors turned into one line that names the field and what is allowed (the options and fields of the shipped
configs and of the user's ``--config-dir``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def format_hydra_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra's multi-line composition errors as one line naming the field and what is allowed (the fields of
    the config groups that ``overrides`` choose: ``engine=pruned engine.methd=x`` lists pruned's)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, OverrideParseException):
        first = re.split(r"\s*See https://", text)[0]
        return f"cannot parse override {exc.override!r}: {one_line(first)} (expected key=value; see --help)"
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
    return one_line(f"{text} {cause}")


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
    return one_line(str(exc))


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


def before_any_job(exc: BaseException) -> bool:
    """Whether ``exc`` came out of Hydra's own set-up (composing the primary config, reading --experimental-rerun)
    with no frame of the harness's code in between: nothing ran, so it is the command line that is wrong."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(Path(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    ours = Path(__file__).parent
    return not any(ours in f.parents for f in frames[1:]) and any("hydra" in f.parts for f in frames)


def hydra_internal_error(exc: BaseException) -> str:
    text = one_line(f"{type(exc).__name__}: {exc}")
    if "Unexpected type for root: NoneType" in text or "'NoneType' object has no attribute" in text:
        return (f"hydra.sweeper.params: not set in this config, so its keys cannot be overridden ({text}); "
                "sweep with -m key=a,b or a +sweep=<name> preset")  # fmt: skip
    return f"{text} (raised by Hydra before any point ran)"


def hydra_flag_error(exc: BaseException) -> bool:
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
    text = one_line(str(exc))
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
