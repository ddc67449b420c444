"""The compute side: reference model, decoding loops, the Engine interface and one module per engine."""

from engines.base import (
    Engine,
    EngineError,
    PrepareContext,
    engine_names,
    get_engine_class,
    make_engine,
    register,
)

__all__ = ["Engine", "EngineError", "PrepareContext", "engine_names", "get_engine_class", "make_engine", "register"]
