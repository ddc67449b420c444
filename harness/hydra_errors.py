"""Hydra outside a job, for the command line: composing a config (``compose``), and Hydra's and OmegaConf's
errors turned into one line that names the field and what is allowed (the options and fields of the shipped
configs and of the user's ``--config-dir``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
        options = ", ".join(_options(group, overrides) or exc.options or []) or "(none)"  # ours: a nested group's
        return f"{group}: unknown option {name!r}; allowed: {options}"
    cause = str(exc.__cause__ or "")
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in cause:
        return unknown_field(m.group(1), overrides)
    conf = re.search(r"Key '[^']+' not in '(\w+)'", cause)
    if m and conf:  # a structured config's node (Hydra's own: a launcher, hydra.run)
        return unknown_struct_field(m.group(1), conf.group(1), overrides)
    m = re.search(r"Ambiguous value for argument '([^=']+)=([^']*)'", text)
    if m and m.group(1).lstrip("+") in _one_of_groups():
        return choose_one(m.group(1).lstrip("+"), m.group(2))
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if m:
        return f"{m.group(1)}: already set by the config; override it without the leading +"
    m = re.search(r"Multiple values for (\S+?)\.? To override a value use 'override \S+: (\S+)'", text)
    if m:  # `+model=small`: the config already chooses a model
        return f"{m.group(1)}: already chosen by the config; use {m.group(1)}={m.group(2)} (without the leading +)"
    return one_line(f"{text} {cause}")


def _one_of_groups() -> tuple[str, ...]:
    from harness.config import GROUPS

    return GROUPS


def choose_one(group: str, names: str) -> str:
    """A group that chooses one option (``engine=[eager,pruned]`` would merge both into one point)."""
    return f"{group}: choose one option, or sweep with -m {group}={names}"


def _override_value(key: str, overrides: Sequence[str]) -> str:
    """The value ``overrides`` give ``key`` (the last one), for an example command; ``...`` when none does."""
    values = [v for k, eq, v in (str(o).partition("=") for o in overrides) if eq and k.lstrip("+~") == key]
    return values[-1] if values else "..."


def unknown_field(key: str, overrides: Sequence[str] = ()) -> str:
    """A key the composed config does not hold. Valid for the validator (``model.head_dim``, the chosen engine's
    parameters) but absent from the YAML: how to add it; else the fields allowed, the YAML's and the validator's."""
    parent, _, leaf = key.rpartition(".")
    composed = _allowed_keys(parent, overrides)
    engine = _engine_name(overrides) if parent == "engine" else None
    accepted = _validator_fields(parent, engine)
    value = _override_value(key, overrides)
    if leaf in accepted:
        chosen = _chosen(parent, overrides)
        if engine and chosen != engine and engine in _options("engine", overrides):
            return (f"{key}: a parameter of engine {engine!r}, which the config of engine={chosen} leaves out; "
                    f"choose engine={engine} (or add it with +{key}={value})")  # fmt: skip
        return f"{key}: not in the composed config; add it with +{key}={value}"
    allowed = sorted(set(composed) | accepted)
    return f"{key}: unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")


def _validator_fields(parent: str, engine: str | None) -> set[str]:
    """The fields ``harness.config.validate`` accepts under ``parent`` (the top level: ``""``), as its checks
    define them; empty where it checks none by a schema."""
    from dataclasses import fields

    from engines.llama import ModelArgs
    from engines.train import TrainConfig
    from harness import config as c

    if parent == "":
        return set(c.TOP_LEVEL - {"hydra"})
    if parent == "engine":
        return {"name", *_engine_params(engine)}
    schemas = {"model": ModelArgs, "workload": c.Workload, "measure": c.Policy, "corpus": c.CorpusSpec,
               "train": TrainConfig, "quality": c.QualitySpec, "monitor": c.MonitorSpec, "roofline": c.RooflineSpec}
    if parent not in schemas:
        return set()
    extra = {"model": {"name", "weights"}}.get(parent, set())
    hidden = {"train": {"seed"}}.get(parent, set())  # set by the top-level seed: refused under train
    return {f.name for f in fields(schemas[parent])} - hidden | extra


def _engine_params(name: str | None) -> list[str]:
    from engines.base import EngineError, get_engine_class

    try:
        return [f.name for f in dataclasses.fields(get_engine_class(str(name)).Params)] if name else []
    except EngineError:
        return []


def _engine_name(overrides: Sequence[str]) -> str | None:
    """The engine the command runs: its last ``engine.name=`` override, else the chosen option's name."""
    named = _override_value("engine.name", overrides)
    if named != "...":
        return named.split(",")[0]
    return _chosen("engine", overrides)


def _chosen(parent: str, overrides: Sequence[str]) -> str | None:
    """The option of group ``parent`` the command chooses (``engine=pruned``; a sweep's first), else the
    default's ``name``."""
    if parent != "engine":
        return None
    choice = _override_value("engine", overrides)
    if choice != "...":
        return choice.split(",")[0].partition("/")[0]
    try:
        return str(compose([], user_config_dirs(overrides)).engine.name)
    except Exception:
        return None


def unknown_struct_field(key: str, conf: str, overrides: Sequence[str] = ()) -> str:
    """A key not in one of Hydra's structured configs (``hydra.launcher.n_jobs`` under the basic launcher): the
    fields of that config, and the options of its group that have the key (``hydra/launcher=joblib``)."""
    parent, _, leaf = key.rpartition(".")
    group = parent.replace(".", "/")
    nodes = _stored_nodes(group)
    fields_of = next((list(n) for n in nodes.values() if _type_name(n) == conf), None) or _hydra_conf_fields(conf)
    text = f"{key}: unknown field of {conf}" + (f"; allowed: {', '.join(sorted(fields_of))}" if fields_of else "")
    having = sorted(name for name, node in nodes.items() if leaf in node)
    if having:
        value = _override_value(key, overrides)
        return (f"{text}; choose a {group} that has it: {', '.join(having)} (e.g. {group}={having[0]} "
                f"{key}={value})")  # fmt: skip
    return text


def _stored_nodes(group: str) -> dict[str, Any]:
    """The configs Hydra's ConfigStore holds for ``group`` (launchers and sweepers of the installed plugins), by
    option name."""
    from hydra.core.config_store import ConfigStore

    try:
        names = ConfigStore.instance().list(group)
    except Exception:  # not a group of the store
        return {}
    out = {}
    for name in names:
        if name.endswith(".yaml"):
            out[name.removesuffix(".yaml")] = ConfigStore.instance().load(f"{group}/{name}").node
    return out


def _type_name(node: Any) -> str:
    from omegaconf import OmegaConf

    kind = OmegaConf.get_type(node)
    return getattr(kind, "__name__", "")


def _hydra_conf_fields(conf: str) -> list[str]:
    """Fields of one of Hydra's own config dataclasses (``RunDir``, ``JobConf``), by its name."""
    import hydra.conf

    kind = getattr(hydra.conf, conf, None)
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


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
    path (the shipped configs and the user's --config-dir) and in Hydra's ConfigStore (``hydra/launcher=basic``,
    ``interleaved``, the installed plugins')."""
    files = {p.stem for d in _search_dirs(args) if (d / group).is_dir() for p in (d / group).glob("*.yaml")}
    return sorted(files | set(_stored_nodes(group)))


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
        keys = sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []  # `device.x`: a value
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


def compose(overrides: Sequence[str], extra_dirs: Sequence[Path | str] = (), with_hydra: bool = False):
    """The job config for ``overrides`` composed from the config tree (and ``extra_dirs``, as --config-dir adds
    them), without running a job; ``with_hydra``: with the ``hydra`` node too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.paths import config_dir

    search = [f"hydra.searchpath=[{','.join(f'file://{Path(d).resolve()}' for d in extra_dirs)}]"] if extra_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[*search, *overrides], return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()
