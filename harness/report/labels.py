"""Scenario labels: which keys make one scenario (the model's weights, the workload, the environment, the sweep),
and the readable label of each row, naming only what varies among the measured points.

A pure function of ``harness.records.load()``'s table, as the rest of the report's data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

# A speedup compares a variant with eager on exactly the same model weights (kind, seed, shape), workload, device
# and dtype, measured in the same environment (fingerprint: machine and software stack): a report over several
# machines, seeds or weights never pools their eagers.
ENV_KEY = "fingerprint"
# what the model's weights are beyond its name; labels name them only where they vary within one model (a sweep
# over models, each with its own shape and weights, names just the models)
MODEL_KEYS = ["weights", "seed", "n_params", "model_id"]
# ``model_id`` (records.model_id) tells apart what the others do not: two shapes with the same parameter count
# (``model.n_heads=4,8``), or weights trained on another corpus or for more steps; labels name the ``model.*``
# fields that differ, or ``weights <id>`` where only the training does
SHAPE_KEYS = ["model", "weights", "seed", "n_params"]
WORKLOAD_KEYS = ["prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype", "threads"]
# which sweep a point comes from: a key only in a report over several sweeps that measured the same point on the
# same machine (``harness report A B``, ``prepare(sweep_labels=True)``); empty elsewhere, so that eager from one
# sweep still serves the variants of another
SWEEP_KEY = "sweep_tag"
SCENARIO_KEYS = ["model", *MODEL_KEYS, *WORKLOAD_KEYS, ENV_KEY, SWEEP_KEY]
ENV_TAG_LEN = 8  # "env 3fa2c91b": the fingerprint's first characters name an environment in labels


def _scenario_label(row: pd.Series, varying: list[str]) -> str:
    parts = [str(row["model"])]
    for key in varying:
        value = row[key]
        if key == "num_beams":
            continue
        if key == "decoding" and value == "beam":
            parts.append(f"beam×{int_text(row['num_beams'])}")
        elif key in ("prompt_len", "gen_len"):
            parts.append(f"{key.split('_')[0]} {int_text(value)}")
        elif key == "threads":
            n = int_text(value)
            parts.append(f"{n} thread" if n == "1" else f"{n} threads")
        elif key == ENV_KEY:
            parts.append(env_tag(value))
        elif key == SWEEP_KEY:
            parts.append(f"sweep {value}")
        elif key == "weights":
            parts.append(f"{value} weights")
        elif key == "seed":
            parts.append(f"seed {int_text(value)}")
        elif key == "n_params":
            parts.append(_params(value))
        elif key == "model_id":
            if row.get("_model_tag"):
                parts.append(row["_model_tag"])
        else:
            parts.append(str(value))
    return " · ".join(parts)


def int_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, int | float) and math.isfinite(value) else str(value)


def _params(n: Any) -> str:
    """``3.02M params``: the model's shape in a label (two shapes of one model differ in their parameter count)."""
    if not isinstance(n, int | float) or not math.isfinite(n):
        return "? params"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit} params"
    return f"{int(n)} params"


def env_tag(fingerprint: Any) -> str:
    """Short name of an environment fingerprint for labels (``env 3fa2c91b``; ``env unknown`` without one)."""
    if fingerprint is None or (isinstance(fingerprint, float) and math.isnan(fingerprint)):
        return "env unknown"
    return f"env {str(fingerprint)[:ENV_TAG_LEN]}"


def varying_keys(df: pd.DataFrame) -> list[str]:
    """Scenario keys (other than the model) that take more than one value: only those go into labels. The model's
    weights, seed and shape count only where they vary within one model (the demo's trained ``tiny`` beside a
    random larger shape needs no tag). The fingerprint counts only where two environments share a workload
    (several machines or stacks in one report), not where it follows from another key (a thread count is part of
    the fingerprint)."""
    others = [k for k in SCENARIO_KEYS if k not in (ENV_KEY, SWEEP_KEY)]

    def varies(key: str) -> bool:
        if key == "model_id":
            # a row stored by an older version has none: it names no shape, so it is not one more
            return bool(len(df)) and df.groupby(SHAPE_KEYS, dropna=False)[key].nunique().gt(1).any()
        if key in MODEL_KEYS:
            return bool(len(df)) and df.groupby("model", dropna=False)[key].nunique(dropna=False).gt(1).any()
        return df[key].nunique(dropna=False) > 1

    keys = [k for k in others[1:] if varies(k)]
    if "num_beams" in keys and "decoding" not in keys:
        keys.insert(keys.index("num_beams"), "decoding")
    measured = df[df["status"].eq("ok")] if "status" in df else df  # a point that failed early has no fingerprint
    if len(measured) and measured.groupby(others, dropna=False)[ENV_KEY].nunique(dropna=False).gt(1).any():
        keys.append(ENV_KEY)
    if SWEEP_KEY in df and df[SWEEP_KEY].fillna("").ne("").any():
        keys.append(SWEEP_KEY)
    return keys


def sweep_tags(df: pd.DataFrame) -> pd.Series:
    """Each row's sweep (``sweep_source``: the folder the report found it in, named by its last component, or
    its path where two names agree) where some point was measured in several sweeps in one environment; empty
    where none was (several sweeps of different points read as one: eager in one, the variants in another)."""
    empty = pd.Series("", index=df.index, dtype=object)
    if df.empty or not {"sweep_source", "point_key", "fingerprint"} <= set(df.columns):
        return empty
    source = df["sweep_source"].astype(str)
    key = df["point_key"].astype(str) + "@" + df["fingerprint"].astype(str)
    if not source.groupby(key).nunique().gt(1).any():
        return empty
    names = source.map(lambda p: Path(p).name)
    clash = names.groupby(names).transform(lambda n: source[n.index].nunique() > 1)
    return names.where(~clash, source)


def _model_tags(df: pd.DataFrame) -> pd.Series:
    """Where one model name, weight kind, seed and parameter count hold several ``model_id``s: the ``model.*``
    fields that differ among them (``n_heads 4``), or ``weights <id>`` where the shapes agree (the training
    differs). Empty elsewhere, and for rows without a ``model_id`` (stored by an older version)."""
    tags = pd.Series("", index=df.index, dtype=object)
    fields = [c for c in df.columns if c.startswith("model.")]
    for _, group in df[df["model_id"].notna()].groupby(SHAPE_KEYS, dropna=False):
        if group["model_id"].nunique() < 2:
            continue
        differ = [c for c in fields if group[c].map(cell_text).nunique() > 1]
        for i, row in group.iterrows():
            named = [f"{c.removeprefix('model.')} {cell_text(row[c]) or '-'}" for c in differ]
            tags[i] = " · ".join(named) if named else f"weights {cell_text(row['model_id'])[:ENV_TAG_LEN] or '?'}"
    return tags


def cell_text(v: Any) -> str:
    """A cell as text, missing as empty (a type-blind key: NaN in one frame is None in another)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def scenario_labels(df: pd.DataFrame, env_labels: bool = False) -> pd.Series:
    """Each row's scenario label. Measured (ok) rows name only what varies among the measured rows: a failed or
    skipped point on another workload or corpus does not rename them (nor, in a dashboard, a series from one build
    to the next). The other rows name what varies among all rows, so the failed table tells them apart. Without
    any ok row, every row is labelled against all rows. ``env_labels``: also tag environments (``varying_keys``)."""
    labels = pd.Series("", index=df.index, dtype=object)
    ok = df["status"].eq("ok") if "status" in df else pd.Series(True, index=df.index)
    for rows, pool in ((ok, df[ok] if ok.any() else df), (~ok, df)):
        if not rows.any():
            continue
        varying = [k for k in varying_keys(pool) if env_labels or k != ENV_KEY]
        tagged = pool.assign(_model_tag=_model_tags(pool))
        labels[rows] = tagged.loc[rows[rows].index].apply(_scenario_label, axis=1, varying=varying)
    return labels
