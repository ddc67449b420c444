"""Engine interface: registry, parameter validation, variant labels, entry points."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

import engines.base as base
from engines.base import (
    Engine,
    EngineError,
    choice,
    engine_names,
    get_engine_class,
    make_engine,
    register,
    weight_bytes,
)
from engines.llama import ModelArgs, Transformer


@dataclass(frozen=True)
class ToyParams:
    scheme: str = choice("a", ("a", "b"))
    bits: int = 8
    ratio: float = 0.5
    fast: bool = False
    layers: tuple[int, ...] | None = None


@register
class ToyEngine(Engine):
    name = "toy-test"
    Params = ToyParams

    def available(self, device):  # the one-argument form engines written before the dtype was passed use
        return None if self.params.scheme == "a" else "scheme b needs hardware this machine lacks"

    def prepare(self, model, ctx):
        return model


def test_eager_is_registered_and_returns_the_model(small_model):
    assert "eager" in engine_names()
    eng = make_engine({"name": "eager"})
    assert eng.variant() == "eager" and eng.available(torch.device("cpu")) is None
    assert eng.prepare(small_model, None) is small_model


def test_unknown_engine_lists_allowed():
    with pytest.raises(EngineError, match=r"engine.name: unknown engine 'nope'; allowed: .*eager"):
        get_engine_class("nope")


def test_params_are_typed_and_validated():
    eng = make_engine({"name": "toy-test", "bits": 4, "ratio": 1, "layers": [0, 2]})
    assert eng.params.ratio == 1.0 and isinstance(eng.params.ratio, float) and eng.params.layers == (0, 2)
    bad = [
        ({"bits": "four"}, r"engine.bits: expected an integer, got 'four'"),
        ({"bits": True}, r"engine.bits: expected an integer"),
        ({"ratio": "x"}, r"engine.ratio: expected a number"),
        ({"fast": 1}, r"engine.fast: expected true or false"),
        ({"scheme": "c"}, r"engine.scheme: 'c' is not allowed; allowed: a, b"),
        ({"sparsity": 0.5}, r"engine.sparsity: not a parameter of engine 'toy-test'; allowed: bits, fast, layers"),
        ({"bits": None}, r"engine.bits: a value is required"),
    ]
    for params, msg in bad:
        with pytest.raises(EngineError, match=msg):
            make_engine({"name": "toy-test", **params})


def test_variant_names_non_default_params_only():
    assert make_engine({"name": "toy-test"}).variant() == "toy-test"
    eng = make_engine({"name": "toy-test", "scheme": "b", "bits": 4})
    assert eng.variant() == "toy-test(bits=4, scheme=b)"
    assert eng.available(torch.device("cpu")) == "scheme b needs hardware this machine lacks"
    # the harness passes the point's dtype: a one-argument available() is wrapped to take and ignore it
    assert eng.available(torch.device("cpu"), torch.float32) == "scheme b needs hardware this machine lacks"


def test_duplicate_names_are_refused():
    class Other(Engine):
        name = "toy-test"

    with pytest.raises(TypeError, match="taken"):
        register(Other)


def test_entry_points_register_third_party_engines(monkeypatch, caplog):
    class PluginEngine(Engine):
        name = "plugin-test"

        def prepare(self, model, ctx):
            return model

    class EP:
        def __init__(self, name, obj):
            self.name, self.obj, self.value = name, obj, f"plugin_pkg.mod:{name}"

        def load(self):
            if isinstance(self.obj, Exception):
                raise self.obj
            return self.obj

    class Clash(Engine):  # a plugin whose name a built-in engine holds
        name = "eager"

    import types

    def make_engine():  # a factory, not the class: nothing registers
        return PluginEngine

    empty = types.ModuleType("plugin_pkg.empty")  # a module without @register
    eps = [EP("clash", Clash), EP("broken", ImportError("missing dependency")), EP("plugin-test", PluginEngine),
           EP("factory", make_engine), EP("empty", empty)]  # fmt: skip
    monkeypatch.setattr(base, "entry_points", lambda group: eps if group == "harness.engines" else [])
    monkeypatch.setattr(base, "_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with caplog.at_level(logging.WARNING):
        assert "plugin-test" in engine_names()
    assert "broken" in caplog.text and "missing dependency" in caplog.text
    # the clashing one is left out with a warning; the built-in keeps its name, the plugins after it load
    assert "'clash' not registered" in caplog.text and "engine name 'eager' is taken" in caplog.text
    assert base.get_engine_class("eager") is not Clash
    # what names no engine is said, not silently dropped
    assert "'factory' (plugin_pkg.mod:factory) is function, not an Engine subclass: ignored" in caplog.text
    assert "'empty' (plugin_pkg.mod:empty) is a module that registered no engine" in caplog.text
    assert "factory" not in engine_names() and "plugin-test" in engine_names()


def test_an_engine_module_that_registers_nothing_is_named(monkeypatch, caplog, tmp_path):
    (tmp_path / "unregistered_engines_test.py").write_text(
        "from engines.base import Engine\n\nclass Boom(Engine):\n    name = 'boom-test'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(base.ENGINE_MODULES_ENV, "unregistered_engines_test")
    monkeypatch.setattr(base, "entry_points", lambda group: [])
    monkeypatch.setattr(base, "_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with caplog.at_level(logging.WARNING):
        assert "boom-test" not in engine_names()
    assert "module 'unregistered_engines_test' registered no engine (decorate its Engine subclass" in caplog.text


def test_a_plugin_module_imported_before_its_entry_point_loads_is_not_called_empty(monkeypatch, caplog, tmp_path):
    """Registration is decided per module: a module already imported (here through HARNESS_ENGINES, then named
    again by two entry points) registers nothing new on load, yet its engine is there and no warning says
    otherwise. A package that re-exports an engine from a submodule provides it too."""
    (tmp_path / "plugin_mod_test.py").write_text(
        "from engines.base import Engine, register\n\n@register\nclass P(Engine):\n    name = 'plugin-x-test'\n"
    )
    (tmp_path / "plugin_pkg_test").mkdir()
    (tmp_path / "plugin_pkg_test" / "__init__.py").write_text("from plugin_mod_test import P\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(base.ENGINE_MODULES_ENV, "plugin_mod_test")

    class EP:
        def __init__(self, name, module):
            self.name, self.value = name, module

        def load(self):
            import importlib

            return importlib.import_module(self.value)

    eps = [EP("px", "plugin_mod_test"), EP("px-again", "plugin_mod_test"), EP("pkg", "plugin_pkg_test")]
    monkeypatch.setattr(base, "entry_points", lambda group: eps)
    monkeypatch.setattr(base, "_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with caplog.at_level(logging.WARNING):
        assert "plugin-x-test" in engine_names()
    assert "registered no engine" not in caplog.text


def test_a_failing_builtin_module_is_retried_not_left_half_loaded(monkeypatch):
    monkeypatch.setattr(base, "_LOADED", False)
    monkeypatch.setattr(base, "BUILTIN_MODULES", ("engines.eager", "engines.no_such_engine_test"))
    monkeypatch.setattr(base, "entry_points", lambda group: [])
    for _ in range(2):  # the second call tries again (and says why again), instead of a silent partial registry
        with pytest.raises(ModuleNotFoundError, match="no_such_engine_test"):
            engine_names()
    assert base._LOADED is False
    monkeypatch.setattr(base, "BUILTIN_MODULES", ("engines.eager",))
    assert "eager" in engine_names() and base._LOADED is True


def test_a_keyword_only_dtype_is_passed_by_name():
    """The harness calls available(device, dtype) positionally: a keyword-only dtype still gets it."""
    seen = []

    class KwEngine(Engine):
        name = "kw-dtype-test"

        def available(self, device, *, dtype=None):
            seen.append(dtype)
            return None if dtype != torch.bfloat16 else "no bf16 here"

    cpu = torch.device("cpu")
    assert KwEngine().available(cpu, torch.float32) is None and KwEngine().available(cpu, torch.bfloat16)
    assert KwEngine().available(cpu) is None and seen == [torch.float32, torch.bfloat16, None]

    class KwargsEngine(Engine):
        name = "kwargs-dtype-test"

        def available(self, device, **kw):
            return f"got {kw}"

    assert KwargsEngine().available(cpu, torch.float16) == "got {'dtype': torch.float16}"


def test_weight_bytes_counts_tied_weights_once_and_prefers_the_models_own():
    tied = Transformer.build(ModelArgs(tie_embeddings=True))
    assert weight_bytes(tied) == tied.args.num_params() * 4

    class Packed(torch.nn.Module):
        def weight_bytes(self):
            return 123

    assert weight_bytes(Packed()) == 123
