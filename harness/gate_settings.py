"""What the gate checks and how strictly: the gated metrics with their directions, and the thresholds (default,
per metric, per point) from flags or a YAML/JSON file. Pure data and parsing; ``harness.gate`` applies them.

Precedence of thresholds: per-point rules (file, later rules win) over per-metric values (``--metric
tpot_ms:0.03`` over the file's ``metrics``) over the default minimum relative change of timed metrics
(``--threshold`` over the file's ``threshold``, else 0.05). Memory, top-1 agreement and perplexity have their
own defaults (10% relative, 0.01 absolute, 2% relative) unless set per metric.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class GateInputError(ValueError):
    """Bad gate input (unknown metric, bad threshold, nothing to compare); the message names it."""


DEFAULT_MATCH = ("point_key",)


@dataclass(frozen=True)
class Metric:
    """How one metric is gated.

    ``kind``: ``samples`` (U test on raw samples), ``scalar`` (one value per point: relative threshold only) or
    ``absolute`` (a fraction gated by an absolute drop). ``source`` is the sample key or the table column.
    ``threshold`` None means the gate's default minimum relative change. ``timed`` metrics are unknown when a
    side's timings are not representative; ``env_bound`` ones when the environment fingerprints differ.
    """

    name: str
    kind: str
    higher_is_better: bool
    source: str
    threshold: float | None
    unit: str
    timed: bool = True
    env_bound: bool = True
    quality: bool = False  # scored on the quality inputs: unknown when the sides scored other ones
    positions: str | None = None  # the column counting the positions a fraction is over (its threshold's floor)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ttft_ms", "samples", False, "ttft_ms", None, "ms"),
        Metric("tpot_ms", "samples", False, "tpot_ms", None, "ms"),
        Metric("itl_ms", "samples", False, "itl_ms", None, "ms"),
        Metric("e2e_ms", "samples", False, "e2e_ms", None, "ms"),
        # tokens/s = batch * 1000 / TPOT: tested on the TPOT samples mapped through that function
        Metric("decode_tokens_per_s", "samples", True, "tpot_ms", None, "tok/s"),
        # one value per point; CPU peak RSS moves by allocator whims, hence a looser default than timings
        Metric("peak_memory_mb", "scalar", False, "peak_memory_mb", 0.10, "MB", timed=False),
        # quality against the eager reference on the same machine: comparable across environments
        Metric("fidelity_top1", "absolute", True, "fidelity_top1", 0.01, "", timed=False, env_bound=False,
               quality=True, positions="fidelity_n"),  # fmt: skip
        # the positions scored through single-token decode steps: a broken decode path hides in the mean above
        Metric("fidelity_top1_decode", "absolute", True, "fidelity_top1_decode", 0.01, "", timed=False,
               env_bound=False, quality=True, positions="fidelity_n_decode"),  # fmt: skip
        # NaN or +inf logits at any scored position: their KL and perplexity are not numbers, never "not measured"
        Metric("fidelity_nonfinite", "absolute", False, "fidelity_nonfinite", 0.0, "", timed=False, env_bound=False,
               quality=True),  # fmt: skip
        Metric("ppl", "scalar", False, "ppl", 0.02, "", timed=False, env_bound=False, quality=True),
    )
}
# An agreement drop must amount to this many positions of those scored to count: one or two argmax flips at near-ties
# come from benign numerics (another summation order); 0.01 of the 128 decode positions would be 1.3 of them.
MIN_FLIPPED_POSITIONS = 3
DEFAULT_METRICS = ("tpot_ms", "ttft_ms", "fidelity_top1", "fidelity_top1_decode", "fidelity_nonfinite", "ppl")


@dataclass
class PointRule:
    """Thresholds for the points whose columns match every pattern (fnmatch on the value's text)."""

    match: dict[str, str]
    thresholds: dict[str, float]

    def matches(self, row: Mapping[str, Any]) -> bool:
        return all(fnmatch.fnmatchcase(text_value(row.get(col)), str(pat)) for col, pat in self.match.items())


def text_value(value: Any) -> str:
    """A cell as text for patterns and labels (a float column's 4.0 reads as 4)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Thresholds:
    """Minimum changes: the default (relative, timed metrics), per metric, and per point (later rules win)."""

    default: float = 0.05
    metrics: dict[str, float] = field(default_factory=dict)
    rules: list[PointRule] = field(default_factory=list)

    def get(self, metric: Metric, row: Mapping[str, Any]) -> float:
        value = self.metrics.get(metric.name, self.default if metric.threshold is None else metric.threshold)
        for rule in self.rules:
            if metric.name in rule.thresholds and rule.matches(row):
                value = rule.thresholds[metric.name]
        return value

    @classmethod
    def from_dict(cls, data: Any, where: str = "thresholds") -> Thresholds:
        """``{threshold: 0.05, metrics: {tpot_ms: 0.03}, points: [{match: {variant: "q*"}, thresholds: {...}}]}``"""
        if not isinstance(data, dict):
            raise GateInputError(f"{where}: expected a mapping with threshold, metrics, points")
        unknown = set(data) - {"threshold", "metrics", "points"}
        if unknown:
            raise GateInputError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: threshold, metrics, points"
            )
        out = cls()
        if "threshold" in data:
            out.default = check_threshold(data["threshold"], f"{where}: threshold")
        out.metrics = _metric_thresholds(data.get("metrics") or {}, f"{where}: metrics")
        points = data.get("points") or []
        if not isinstance(points, list):
            raise GateInputError(f"{where}: points must be a list of {{match, thresholds}}")
        for i, rule in enumerate(points):
            at = f"{where}: points[{i}]"
            if not isinstance(rule, dict) or not isinstance(rule.get("match"), dict) or not rule["match"]:
                raise GateInputError(f"{at}: needs a non-empty 'match' mapping (column: pattern)")
            thresholds = _metric_thresholds(rule.get("thresholds") or {}, f"{at}.thresholds")
            if not thresholds:
                raise GateInputError(f"{at}: needs 'thresholds' (metric: value)")
            out.rules.append(PointRule({str(k): str(v) for k, v in rule["match"].items()}, thresholds))
        return out


def check_threshold(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise GateInputError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise GateInputError(f"{where}: must be a finite number >= 0, got {value!r}")
    return x


def check_metric(name: str, where: str = "") -> Metric:
    if name not in METRICS:
        prefix = f"{where}: " if where else ""
        raise GateInputError(f"{prefix}unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return METRICS[name]


def _metric_thresholds(data: Any, where: str) -> dict[str, float]:
    if not isinstance(data, dict):
        raise GateInputError(f"{where}: expected a mapping metric: threshold")
    return {check_metric(str(k), where).name: check_threshold(v, f"{where}.{k}") for k, v in data.items()}


CORRECTIONS = ("none", "holm")


@dataclass
class Settings:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    thresholds: Thresholds = field(default_factory=Thresholds)
    alpha: float = 0.01
    min_samples: int = 5
    confidence: float = 0.95
    allow_env_mismatch: bool = False
    match: tuple[str, ...] = DEFAULT_MATCH
    correction: str = "none"  # none | holm: Holm-Bonferroni over every rank-tested metric of every point
    history: str | None = None  # --history: the database whose stored sweeps give each point's run-to-run spread
    noise_k: float = 3.0  # with a history, an unpaired timed change must exceed noise_k x that spread
    allow_ungated: bool = False  # exit 0 (not 3) when no gated metric of any point got a verdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_metric_flag(text: str) -> tuple[str, float | None]:
    """``tpot_ms`` or ``tpot_ms:0.03`` (a per-metric threshold) from ``--metric``."""
    name, sep, value = text.partition(":")
    metric = check_metric(name.strip())
    return metric.name, check_threshold(value, f"--metric {text}") if sep else None


def load_thresholds(path: Path) -> Thresholds:
    """A thresholds file (YAML or JSON: JSON is YAML)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise GateInputError(f"{path}: cannot read thresholds file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise GateInputError(f"{path}: not a text file (not UTF-8); a thresholds file is YAML or JSON") from None
    except yaml.YAMLError as exc:
        raise GateInputError(f"{path}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
    return Thresholds.from_dict(data or {}, str(path))
