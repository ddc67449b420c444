"""Which points of BASE and CAND the gate compares, and what they are called.

Points match on ``Settings.match`` (default ``point_key``). Two records of one point in a sweep (a re-run) collapse
to the latest; distinct points that share a match key are refused, never silently swapped. A point whose key
changed for a reason its readable identity does not show (an engine gained a parameter at its default) is paired
with its twin by that identity and gated, with a note, rather than falling out of the gate as "only in BASE" and
"only in CAND". Pure functions of tables; ``harness.gate.compare`` uses them.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.gate_settings import GateInputError, text_value

# the readable identity of a point: what its label can show (the engine's parameters are in its variant label)
IDENTITY = ["variant", "model", "weights", "batch_size", "prompt_len", "gen_len", "decoding", "num_beams", "device",
            "dtype", "seed", "threads"]  # fmt: skip
LABEL_OPTIONAL = ["prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype", "seed", "weights", "threads"]
SHORT = {"prompt_len": "p", "gen_len": "g", "num_beams": "beams", "seed": "seed"}
KEY_TAG = 8  # point_key characters that tell apart two points whose labels agree


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _part(key: str, value: Any) -> str:
    if key == "threads":
        n = text_value(value)
        return f"{n} thread" if n == "1" else f"{n} threads"
    if key.startswith("model."):
        return f"{key.removeprefix('model.')} {text_value(value)}"
    return f"{SHORT.get(key, '')}{text_value(value)}"


def point_labels(df: pd.DataFrame, side: pd.Series | None = None) -> pd.Series:
    """Readable point names: variant, model and batch, plus whichever workload fields, thread counts and model
    shape fields (``model.*``) vary; distinct points of one ``side`` whose names still agree get
    ``point_key[:8]`` (a point of BASE and its twin in CAND whose key changed keep one name)."""
    if not len(df):
        return pd.Series(dtype=str)
    shape = sorted(c for c in df.columns if c.startswith("model."))
    varying = [k for k in [*LABEL_OPTIONAL, *shape] if k in df.columns and df[k].map(_text).nunique() > 1]

    def label(r: pd.Series) -> str:
        parts = [str(r.get("variant")), str(r.get("model")), f"b{text_value(r.get('batch_size'))}"]
        parts += [_part(k, r.get(k)) for k in varying]
        return " · ".join(parts)

    labels = df.apply(label, axis=1)
    if "point_key" in df.columns:
        keys = df["point_key"].map(_text)
        group = [labels] if side is None else [side, labels]
        clash = keys.groupby(group).transform("nunique").gt(1)
        labels = labels.where(~clash, labels + " · " + keys.str[:KEY_TAG])
    return labels


def _text(value: Any) -> str:
    return "" if _missing(value) else text_value(value)


def match_keys(df: pd.DataFrame, on: list[str]) -> pd.Series:
    """Each row's match key as one text (4.0 and 4 are one batch size)."""
    return df[on].map(text_value).agg(" | ".join, axis=1)


def _started(df: pd.DataFrame) -> pd.Series:
    """Start times as instants (records may write other UTC offsets; text order would misplace them)."""
    if "started_at" not in df.columns:
        return pd.Series(pd.NaT, index=df.index)
    return pd.to_datetime(df["started_at"], utc=True, errors="coerce", format="ISO8601")


def dedupe(df: pd.DataFrame, on: list[str], side: str, notes: list[str]) -> pd.DataFrame:
    """One row per match key: of the records of one point (the same ``point_key``: a re-run) the latest wins,
    with a note; distinct points that share a match key are refused (GateInputError naming them): comparing
    either one would gate a point against another."""
    if df.empty:
        return df
    key = match_keys(df, on)  # as text: a list-valued engine parameter is a key too
    dup = key.duplicated(keep=False)
    if not dup.any():
        return df
    if "point_key" in df.columns:
        labels = point_labels(df)
        distinct = df.loc[dup, "point_key"].map(_text).groupby(key[dup]).nunique()
        clashes = distinct[distinct > 1].index.tolist()
        if clashes:
            first = clashes[0]
            names = ", ".join(sorted(set(labels[key.eq(first)])))
            more = f" (and {len(clashes) - 1} more match key(s))" if len(clashes) > 1 else ""
            raise GateInputError(
                f"{side}: distinct points share the match key {first!r} of --match {','.join(on)}: {names}{more}; "
                "add a column that tells them apart (e.g. variant) or compare one of them"
            )
    keys = int(key[dup].nunique())
    notes.append(f"{side}: {int(dup.sum())} records share {keys} match key(s) (re-runs of one point); the latest of "
                 "each is compared")  # fmt: skip
    order = _started(df).sort_values(na_position="first", kind="stable").index
    return df.loc[order][~key.loc[order].duplicated(keep="last")]


def identity_text(row: pd.Series) -> str:
    """A point's readable identity as one text: the fields of ``IDENTITY`` and its ``model.*`` shape fields."""
    parts = [f"{k}={_text(row.get(k))}" for k in IDENTITY]
    parts += [f"{k}={_text(v)}" for k, v in sorted(row.items()) if str(k).startswith("model.") and not _missing(v)]
    return " | ".join(parts)


def pair_changed_keys(b: pd.DataFrame, c: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """CAND re-keyed so that each unmatched CAND point whose readable identity is that of exactly one unmatched
    BASE point takes that point's match key (its key changed, what it measures did not: it is gated, with a
    note). Two or more candidates for one identity cannot be paired soundly: GateInputError naming them."""
    lone_b, lone_c = b[~b.index.isin(c.index)], c[~c.index.isin(b.index)]
    if lone_b.empty or lone_c.empty:
        return c
    ib, ic = lone_b.apply(identity_text, axis=1), lone_c.apply(identity_text, axis=1)
    rename: dict[str, str] = {}
    for ident in sorted(set(ib) & set(ic)):
        kb, kc = ib.index[ib.eq(ident)], ic.index[ic.eq(ident)]
        label = str(lone_b.loc[kb[0], "_label"])
        if len(kb) > 1 or len(kc) > 1:
            raise GateInputError(
                f"point key changed for {label}: {len(kb)} BASE and {len(kc)} CAND point(s) share its readable "
                "identity but no key, so they cannot be paired; compare with --match on the columns that tell "
                "them apart"
            )
        rename[kc[0]] = kb[0]
        notes.append(f"point key changed: {label} ({str(kb[0])[:KEY_TAG]} in BASE, {str(kc[0])[:KEY_TAG]} in CAND): "
                     "paired by its readable identity and gated")  # fmt: skip
    return c.rename(index=rename) if rename else c


def unmatched(side: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Points of ``side`` with no partner in ``other``: listed in every output, never silently dropped."""
    rows = side.loc[~side.index.isin(other.index)]
    cols = [c for c in ("_label", "point_key", "status", "error") if c in rows.columns]
    return rows[cols].rename(columns={"_label": "label"}).reset_index(drop=True)
