"""The pruned engine's parameters: bad values refused naming the field, and one spelling per model (label,
parameters and point key follow what is built, not how it was asked)."""

from __future__ import annotations

import pytest

from engines.base import EngineError, make_engine
from harness.records import point_key


def test_invalid_params_are_refused_naming_the_field():
    cases = {
        r"engine.sparsity: method=2:4 keeps two of every four": {"method": "2:4", "sparsity": 0.7},
        r"engine.sparsity: must be in \[0, 1\)": {"sparsity": 1.0},
        r"engine.format: csr is for method=magnitude or wanda; allowed for method=structured: auto, dense$": {
            "method": "structured",
            "format": "csr",
        },
        r"engine.format: semi_structured is for method=2:4; allowed for method=wanda: auto, dense, csr$": {
            "method": "wanda",
            "format": "semi_structured",
        },
        r"engine.format: csr is for method=magnitude or wanda; allowed for method=2:4: auto, dense, semi_structured$": {
            "method": "2:4",
            "format": "csr",
        },
        r"engine.score: picks the kept pair of method=2:4 only": {"method": "magnitude", "score": "wanda"},
        r"engine.layers: method=structured prunes every block alike": {
            "method": "structured",
            "layers": ["layers.0.*"],
        },
        r"engine.method: 'l1' is not allowed; allowed: magnitude, wanda, 2:4, structured": {"method": "l1"},
        r"engine.granularity: applies to method=magnitude or wanda only": {"method": "2:4", "granularity": "row"},
    }
    for pattern, params in cases.items():
        with pytest.raises(EngineError, match=pattern):
            make_engine({"name": "pruned", **params})
    # calibration fields of a method without calibration stay out of its label and point key: a sweep that
    # crosses them with wanda measures the magnitude point as the model it is
    given = {"calibration_seqs": 8, "calibration_seq_len": 64, "calibration_seed": 1}
    for params in ({"method": "magnitude"}, {"method": "2:4", "score": "magnitude"}):
        plain = make_engine({"name": "pruned", **params})
        assert make_engine({"name": "pruned", **params, **given}).param_dict() == plain.param_dict()
    for method in ("wanda", "structured", "2:4"):  # these calibrate (2:4 by wanda unless told otherwise)
        assert "calibration_seqs=8" in make_engine({"name": "pruned", "method": method, **given}).variant()


def test_synonyms_of_one_model_are_one_variant_one_param_set_and_one_point_key():
    """2:4's null score is wanda, and structured [all_but_head] is both parts in either order: each spelling of
    one model gets the label it had, the same parameters (the table's engine.* columns) and the same point key."""
    synonyms = {
        "pruned(method=2:4, sparsity=0.5, score=wanda)": [{"method": "2:4"}, {"method": "2:4", "score": "wanda"}],
        "pruned(method=structured, sparsity=0.5)": [
            {"method": "structured"}, {"method": "structured", "layers": ["all_but_head"]},
            {"method": "structured", "layers": ["attention", "feed_forward"]},
            {"method": "structured", "layers": ["feed_forward", "attention"]},
        ],
        "pruned(method=structured, sparsity=0.5, layers=('attention',))": [
            {"method": "structured", "layers": ["attention"]},
        ],
    }  # fmt: skip
    for label, spellings in synonyms.items():
        engines = [make_engine({"name": "pruned", **params}) for params in spellings]
        assert {e.variant() for e in engines} == {label}
        assert all(e.param_dict() == engines[0].param_dict() for e in engines), label
        keys = {point_key({"engine": "pruned", "variant": e.variant(), "engine_params": e.param_dict()})
                for e in engines}  # fmt: skip
        assert len(keys) == 1, label
        # the canonical parameters build the same engine again (a record's engine_params read back)
        assert make_engine({"name": "pruned", **engines[0].param_dict()}).param_dict() == engines[0].param_dict()
    assert make_engine({"name": "pruned", "method": "2:4"}).param_dict()["score"] == "wanda"
    assert make_engine({"name": "pruned", "method": "structured"}).param_dict()["layers"] == ("all_but_head",)
    # different models stay apart
    magnitude = make_engine({"name": "pruned", "method": "2:4", "score": "magnitude"})
    assert magnitude.variant() == "pruned(method=2:4, sparsity=0.5, score=magnitude)"
    ffn = make_engine({"name": "pruned", "method": "structured", "layers": ["feed_forward"]})
    assert ffn.param_dict()["layers"] == ("feed_forward",)
