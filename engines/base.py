"""The Engine interface and its registry.

An engine is a named transform of the reference model. It never times itself: ``prepare`` returns a module
with the reference's ``forward(tokens, input_pos) -> logits`` and ``setup_caches(max_batch_size,
max_seq_length)``, and the harness drives it with the shared decoding loops.

Parameters are a dataclass per engine (``Params``); its fields are the keys of the engine's Hydra config group,
so ``engine.bits=4`` is validated, typed and sweepable. Third-party engines register through the
``harness.engines`` entry-point group (an entry point may name an Engine subclass or a module that registers
one with ``@register``), or, without packaging, through modules named in the HARNESS_ENGINES environment variable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from engines.llama import ModelArgs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.engines"
# Modules to import for their @register'ed engines without packaging an entry point (local development):
# HARNESS_ENGINES=my_engines,other.module harness run engine.name=mine
ENGINE_MODULES_ENV = "HARNESS_ENGINES"
BUILTIN_MODULES = (
    "engines.eager", "engines.distilled", "engines.quantized", "engines.pruned", "engines.fused", "engines.compiled",
)  # fmt: skip


class EngineError(ValueError):
    """Invalid engine name or parameter; the message names the field and what is allowed."""


@dataclass(frozen=True)
class NoParams:
    pass


def choice(default: Any, choices: tuple[Any, ...], help: str = "") -> Any:
    """A dataclass field restricted to a set of values (validated and listed in errors)."""
    return field(default=default, metadata={"choices": choices, "help": help})


@dataclass
class PrepareContext:
    """What an engine may know when it transforms the reference model."""

    device: torch.device
    dtype: torch.dtype
    seed: int
    model_name: str
    model_args: ModelArgs
    cache_dir: Path
    reference_key: str = ""  # stable identity of the reference weights, for engines' own caches
    trained: bool = False  # the weights were trained: data-driven transforms (calibration, distillation) apply
    train_tokens: torch.Tensor | None = None  # corpus train split (calibration, distillation), 1-D int64
    heldout_tokens: torch.Tensor | None = None  # corpus held-out split, for an engine's own evaluation
    extras: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Base class: subclass, set ``name`` (and ``Params``), implement ``prepare``, decorate with @register."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    description: ClassVar[str] = ""

    def __init__(self, params: Any | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An engine written against ``available(self, device)`` (before the dtype was passed) keeps working:
        its method is wrapped to take and ignore the dtype (or to pass it by name when it is keyword-only)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("available")
        if own is None:
            return
        try:
            params = list(inspect.signature(own).parameters.values())
        except (TypeError, ValueError):
            return
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params):
            return  # takes the dtype as the harness passes it, positionally
        # a keyword-only dtype (``available(self, device, *, dtype=None)``) is passed by name, else dropped
        by_name = any(p.kind is p.VAR_KEYWORD or (p.kind is p.KEYWORD_ONLY and p.name == "dtype") for p in params)

        @functools.wraps(own)
        def available(self: Engine, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
            return own(self, device, dtype=dtype) if by_name else own(self, device)

        cls.available = available  # type: ignore[method-assign]

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        """None when this engine (with its params) can run on ``device`` with weights in ``dtype`` (when given),
        else the human reason: the point is recorded as skipped, never failed (which a gate reads as a
        regression)."""
        return None

    def check_model(self, args: Any, trained: bool) -> None:
        """Raise ValueError (one line naming the field) for parameters this model shape cannot take (a layer index
        past its depth, a length past its context): the sweep's preflight refuses the point before any work,
        instead of a point that builds the model and then fails. ``trained``: the reference has trained weights."""

    def timing_caveat(self, device: torch.device) -> str | None:
        """None when timings on ``device`` are representative, else why not (e.g. an interpreted kernel)."""
        return None

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        """Return the model to time. Must not modify ``model`` in place: the reference is shared."""
        raise NotImplementedError

    # -- identity ---------------------------------------------------------------------------------------
    def reads_corpus(self) -> bool:
        """Whether ``prepare`` reads the corpus's tokens whatever the weights (calibration): the point key then
        names the corpus, so that another corpus is another point. (Trained weights name it anyway.)"""
        return False

    def param_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def non_default_params(self) -> dict[str, Any]:
        default = dataclasses.asdict(self.Params())
        return {k: v for k, v in self.param_dict().items() if default.get(k) != v}

    def variant(self) -> str:
        """Readable label: the name plus non-default parameters, e.g. ``quantized(scheme=int8_dynamic)``."""
        extra = self.non_default_params()
        if not extra:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in sorted(extra.items()))})"


_REGISTRY: dict[str, type[Engine]] = {}
_LOADED = False  # set once the built-in engines are imported (a failure among them is retried on the next call)
_LOADING = False  # a module being imported may ask for the registry: it gets what is there so far


def register(cls: type[Engine]) -> type[Engine]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"engine name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _provides_engine(module: types.ModuleType) -> bool:
    """Whether a registered engine is defined in ``module`` (or imported into it). Decided per module, not by
    whether the registry grew: a module imported earlier (by user code, HARNESS_ENGINES or another entry point)
    registers nothing new when loaded again, yet its engines are there."""
    names = vars(module)
    return any(c.__module__ == module.__name__ or names.get(c.__name__) is c for c in _REGISTRY.values())


def _load_all() -> None:
    global _LOADED, _LOADING
    if _LOADED or _LOADING:
        return
    _LOADING = True
    try:
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
        _LOADED = True
        _load_plugins()
    finally:
        _LOADING = False


def _load_plugins() -> None:
    global _LOADED
    for mod in (m.strip() for m in os.environ.get(ENGINE_MODULES_ENV, "").split(",")):
        if not mod:
            continue
        try:
            module = importlib.import_module(mod)
        except Exception as exc:
            _LOADED = False
            why = f"{exc.__class__.__name__}: {exc}"
            raise EngineError(f"{ENGINE_MODULES_ENV}: cannot import {mod!r} ({why})") from None
        if not _provides_engine(module):
            log.warning("%s: module %r registered no engine (decorate its Engine subclass with "
                        "@engines.base.register)", ENGINE_MODULES_ENV, mod)  # fmt: skip
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the harness down
            log.warning("engine entry point %r failed to load: %s", ep.name, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Engine):
            try:
                register(obj)
            except TypeError as exc:  # a name another engine holds: this plugin is left out, the others load
                log.warning("engine entry point %r not registered: %s", ep.name, exc)
        elif not isinstance(obj, types.ModuleType) or not _provides_engine(obj):
            what = "a module that registered no engine" if isinstance(obj, types.ModuleType) else type(obj).__name__
            log.warning("engine entry point %r (%s) is %s, not an Engine subclass: ignored (point it at the "
                        "class, or at a module that decorates it with @register)", ep.name, ep.value, what)  # fmt: skip


def engine_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_engine_class(name: str) -> type[Engine]:
    _load_all()
    if name not in _REGISTRY:
        raise EngineError(f"engine.name: unknown engine {name!r}; allowed: {', '.join(engine_names())}")
    return _REGISTRY[name]


def _coerce(key: str, value: Any, typ: Any, choices: tuple[Any, ...] | None) -> Any:
    """Check one parameter against its dataclass type (``int``, ``float``, ``bool``, ``str``, tuples, Optional)."""
    if hasattr(value, "_content"):  # an OmegaConf node
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value)
    members = get_args(typ) if isinstance(typ, UnionType) or get_origin(typ) is Union else (typ,)
    base = next((t for t in members if t is not type(None)), typ)
    if value is None:
        if type(None) in members:
            return None
        raise EngineError(f"engine.{key}: a value is required (got null)")
    if base is bool and not isinstance(value, bool):
        raise EngineError(f"engine.{key}: expected true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise EngineError(f"engine.{key}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EngineError(f"engine.{key}: expected a number, got {value!r}")
        value = float(value)
    if base is str:
        value = str(value)
    if get_origin(base) is tuple:
        if not isinstance(value, list | tuple):
            raise EngineError(f"engine.{key}: expected a list, got {value!r}")
        elem = get_args(base)
        if len(elem) == 2 and elem[1] is Ellipsis:  # tuple[int, ...]: each entry checked like a parameter
            value = tuple(_coerce(f"{key}[{i}]", v, elem[0], None) for i, v in enumerate(value))
        else:
            value = tuple(value)
    if choices is not None and value not in choices:
        raise EngineError(f"engine.{key}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    return value


def make_engine(cfg: dict[str, Any]) -> Engine:
    """Build an engine from its config node ``{name: ..., <param>: ...}``, validating every parameter."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if not name:
        raise EngineError(f"engine.name: missing; allowed: {', '.join(engine_names())}")
    cls = get_engine_class(str(name))
    hints = get_type_hints(cls.Params)
    known = {f.name: f for f in dataclasses.fields(cls.Params)}
    kwargs = {}
    for key, value in cfg.items():
        if key not in known:
            allowed = ", ".join(sorted(known)) or "(none)"
            raise EngineError(f"engine.{key}: not a parameter of engine {name!r}; allowed: {allowed}")
        kwargs[key] = _coerce(key, value, hints[key], known[key].metadata.get("choices"))
    try:
        params = cls.Params(**kwargs)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"engine: invalid parameters for {name!r}: {exc}") from None
    return cls(params)


def engine_info(model: nn.Module) -> dict[str, Any]:
    """What an engine reports about its prepared model (``model.engine_info``, a dict set by ``prepare``):
    measured sparsity, the student's shape and training, stored bytes per scheme... Goes into the record; the
    harness calls this once per point, as the point begins. A model whose information grows as it runs (a
    compiled engine's compilations, reused by later points) defines ``point_info()``, the info of a point that
    begins now, so that each record carries its own point's share only."""
    point_info = getattr(model, "point_info", None)
    info = point_info() if callable(point_info) else getattr(model, "engine_info", None)
    return dict(info) if isinstance(info, dict) else {}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a forward pass reads: the model's own ``weight_bytes()`` when it defines one (quantized
    or sparse formats know their storage), else every distinct parameter counted once (tied ones too)."""
    own = getattr(model, "weight_bytes", None)
    if callable(own):
        return int(own())
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total
