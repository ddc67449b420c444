"""Validation of a composed config into a typed point specification.

Every check names the config field and what is allowed, in one line, and runs before any work starts (for a
multirun: for every point of the sweep before the first one runs).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engines.base import Engine, EngineError, make_engine
from engines.llama import ModelArgs
from engines.train import PRECISIONS, TrainConfig
from harness.timing import Policy

DEVICES = "auto, cpu, cuda, cuda:N"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODINGS = ("greedy", "beam")
WEIGHTS = ("random", "trained")
GROUPS = ("model", "engine", "workload", "measure")
# every top-level key of configs/config.yaml besides the groups (and Hydra's own node); `note` is free text a
# user may add (`+note=...`): kept in the record's config, not part of the point key
SETTINGS = (
    "device", "dtype", "seed", "threads", "isolate", "resume", "cache_dir", "corpus", "train", "monitor",
    "roofline", "profile", "profile_steps", "quality", "note",
)  # fmt: skip
TOP_LEVEL = frozenset((*GROUPS, *SETTINGS, "hydra"))
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "llm-inference-harness"


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line naming the field and the allowed values."""


@dataclass(frozen=True)
class Workload:
    batch_size: int = 1
    prompt_len: int = 128
    gen_len: int = 32
    decoding: str = "greedy"
    num_beams: int = 1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str
    args: ModelArgs


@dataclass(frozen=True)
class CorpusSpec:
    path: str | None = None
    heldout_every: int = 20


@dataclass(frozen=True)
class QualitySpec:
    enabled: bool = True
    n_seqs: int = 8
    seq_len: int = 256
    greedy_prompts: int = 4
    greedy_prompt_len: int = 64
    greedy_len: int = 32
    decode_positions: int = 16


@dataclass(frozen=True)
class MonitorSpec:
    enabled: bool = True
    interval_s: float = 0.05


@dataclass(frozen=True)
class RooflineSpec:
    enabled: bool = True
    bandwidth_gbs: float | None = None
    tflops: float | None = None


@dataclass(frozen=True)
class ProfileSpec:
    enabled: bool = False
    steps: int = 8


@dataclass
class PointSpec:
    """Everything a point needs, validated."""

    model: ModelSpec
    engine: Engine
    workload: Workload
    policy: Policy
    device: torch.device
    dtype: torch.dtype
    seed: int
    cfg: dict[str, Any]
    corpus: CorpusSpec = CorpusSpec()
    train: TrainConfig = TrainConfig()
    quality: QualitySpec = QualitySpec()
    monitor: MonitorSpec = MonitorSpec()
    roofline: RooflineSpec = RooflineSpec()
    profile: ProfileSpec = ProfileSpec()
    isolate: bool = False
    resume: bool = False
    threads: int | None = None  # torch intra-op threads; None: torch's default for this process

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()


SEED_MAX = 2**32 - 1
# 1M positions, eight times Llama 3.1's context: the rotary tables of every position are built with the model
# (a typo's 10^8 takes tens of GB before anything runs), and fp32 positions lose integers past 2^24
MAX_SEQ_LEN = 1 << 20


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{field}: must be an integer >= {minimum}, got {value}")
    return value


def _number(value: Any, field: str, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if not math.isfinite(value):  # nan passes every comparison; inf is no limit nor a size (null means none)
        raise ConfigError(f"{field}: must be a finite number, got {value}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{field}: must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def writable_dir(path: Path, field: str) -> None:
    """The directory exists (or is made now) and takes files, else one line naming ``field``: a cache or
    output folder that cannot take files would fail every point after it was measured."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot create {str(path)!r} ({exc.strerror or exc}); give a writable "
                          "directory") from None  # fmt: skip
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {str(path)!r} is not writable; give a writable directory")


def resolve_device(value: Any) -> torch.device:
    text = str(value).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"device: {value!r} is not a device; allowed: {DEVICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {value!r} requested but CUDA is not available on this machine; allowed: auto, cpu")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device: {value!r} does not exist; this machine has cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_dtype(value: Any, device: torch.device) -> torch.dtype:
    text = str(value).strip().lower()
    if text == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text not in DTYPES:
        raise ConfigError(f"dtype: {value!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[text]


def _model(m: dict[str, Any]) -> ModelSpec:
    if not isinstance(m, dict) or not m.get("name"):
        raise ConfigError("model: missing or has no name; choose a shape with model=<name> (see configs/model/)")
    weights = m.get("weights", "random")
    if weights not in WEIGHTS:
        raise ConfigError(f"model.weights: {weights!r} is not supported; allowed: {', '.join(WEIGHTS)}")
    known = {f.name for f in fields(ModelArgs)} | {"name", "weights"}
    extra = sorted(set(m) - known)
    if extra:
        raise ConfigError(f"model.{extra[0]}: unknown field; allowed: {', '.join(sorted(known))}")
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
        if key in m:
            _int(m[key], f"model.{key}", 2 if key == "vocab_size" else 1)  # prompts draw ids 1..vocab_size - 1
    if "max_seq_len" in m and m["max_seq_len"] > MAX_SEQ_LEN:  # rotary tables are built for every position
        raise ConfigError(f"model.max_seq_len: must be an integer in 1..{MAX_SEQ_LEN}, got {m['max_seq_len']}")
    if m.get("head_dim") is not None:
        _int(m["head_dim"], "model.head_dim", 0)
    for key in ("rope_base", "norm_eps"):
        if key in m:
            _number(m[key], f"model.{key}", 0.0, strict=True)
    if "tie_embeddings" in m:
        _bool(m["tie_embeddings"], "model.tie_embeddings")
    _rope_scaling(m.get("rope_scaling"))
    if not m.get("head_dim") and m.get("dim", 0) % m.get("n_heads", 1):
        raise ConfigError(
            f"model.n_heads: must divide model.dim={m['dim']} (or set model.head_dim), got {m['n_heads']}"
        )
    args = ModelArgs.from_dict(m)
    if args.n_heads % args.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads: must divide model.n_heads={args.n_heads}, got {args.n_kv_heads}")
    if args.head_dim % 2:
        raise ConfigError(f"model.head_dim: must be even for rotary embeddings, got {args.head_dim}")
    return ModelSpec(name=str(m["name"]), weights=str(weights), args=args)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(value: Any) -> None:
    """Llama-3's long-context RoPE scaling: null, or a mapping of exactly its four numbers."""
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != set(ROPE_SCALING_KEYS):
        raise ConfigError(f"model.rope_scaling: expected null or a mapping of {', '.join(ROPE_SCALING_KEYS)}, "
                          f"got {value!r}")  # fmt: skip
    for key in ROPE_SCALING_KEYS:
        _number(value[key], f"model.rope_scaling.{key}", 0.0, strict=True)
    if value["low_freq_factor"] == value["high_freq_factor"]:
        raise ConfigError("model.rope_scaling.high_freq_factor: must differ from low_freq_factor (it divides by "
                          "their difference)")  # fmt: skip


def _workload(w: dict[str, Any], model: ModelSpec) -> Workload:
    known = {f.name for f in fields(Workload)}
    extra = sorted(set(w) - known)
    if extra:
        raise ConfigError(f"workload.{extra[0]}: unknown field; allowed: {', '.join(sorted(known))}")
    wl = Workload(**{**Workload().__dict__, **w})
    _int(wl.batch_size, "workload.batch_size", 1)
    _int(wl.prompt_len, "workload.prompt_len", 1)
    _int(wl.gen_len, "workload.gen_len", 2)
    _int(wl.num_beams, "workload.num_beams", 1)
    if wl.decoding not in DECODINGS:
        raise ConfigError(f"workload.decoding: {wl.decoding!r} is not supported; allowed: {', '.join(DECODINGS)}")
    if wl.decoding == "greedy" and wl.num_beams != 1:
        raise ConfigError(f"workload.num_beams: must be 1 with decoding=greedy (use decoding=beam), got {wl.num_beams}")
    if wl.decoding == "beam" and wl.num_beams > model.args.vocab_size:
        raise ConfigError(
            f"workload.num_beams: at most the vocabulary size {model.args.vocab_size}, got {wl.num_beams}"
        )
    total = wl.prompt_len + wl.gen_len
    if total > model.args.max_seq_len:
        raise ConfigError(
            f"workload.prompt_len + workload.gen_len: {wl.prompt_len} + {wl.gen_len} = {total} exceeds "
            f"model.max_seq_len={model.args.max_seq_len} of model {model.name!r}"
        )
    return wl


def _policy(p: dict[str, Any]) -> Policy:
    known = set(Policy.__dataclass_fields__)
    extra = sorted(set(p) - known)
    if extra:
        raise ConfigError(f"measure.{extra[0]}: unknown field; allowed: {', '.join(sorted(known))}")
    for key in ("warmup_iters", "min_reps", "max_reps"):
        if key in p:
            _int(p[key], f"measure.{key}", 1 if key != "warmup_iters" else 0)
    for key in ("warmup_s", "warmup_max_s", "max_time_s", "warmup_stable_rel"):
        if key in p:
            _number(p[key], f"measure.{key}", 0.0)
    if "warmup_s" in p or "warmup_max_s" in p:  # the cap on waiting for stability cannot cut the minimum time
        least = p.get("warmup_s", Policy.warmup_s)
        most = p.get("warmup_max_s", Policy.warmup_max_s)
        if most < least:
            raise ConfigError(f"measure.warmup_max_s: {most} is below measure.warmup_s={least}, the least warm-up "
                              f"time; give warmup_max_s >= warmup_s")  # fmt: skip
    if "target_ci" in p:
        _number(p["target_ci"], "measure.target_ci", 0.0, strict=True)
    if p.get("timeout_s") is not None:
        _number(p["timeout_s"], "measure.timeout_s", 0.0, strict=True)
    if "disable_gc" in p:
        _bool(p["disable_gc"], "measure.disable_gc")
    if "confidence" in p and not 0.5 <= _number(p["confidence"], "measure.confidence", 0.5) < 1:
        raise ConfigError(f"measure.confidence: must be in [0.5, 1), got {p['confidence']}")
    policy = Policy.from_dict(p)
    if policy.max_reps < policy.min_reps:
        raise ConfigError(f"measure.max_reps: must be >= measure.min_reps={policy.min_reps}, got {policy.max_reps}")
    return policy


def _fields(node: Any, name: str, cls: type, hidden: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a node's keys against a dataclass and return it as a dict. ``hidden`` fields pass this check but are
    not listed as allowed (the caller refuses them with a message of its own)."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(f"{name}: expected a mapping of fields, got {node!r}")
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(node) - known)
    if extra:
        allowed = sorted(known - set(hidden))
        raise ConfigError(f"{name}.{extra[0]}: unknown field; allowed: {', '.join(allowed)}")
    return node


def launch_dir() -> Path:
    """The directory `harness run` started in: a job's own folder is the cwd under ``hydra.job.chdir=true``, and
    relative paths the user typed mean the launch directory, as they do in the preflight of every point."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def _from_launch_dir(path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else launch_dir() / p)


def _corpus(c: Any) -> CorpusSpec:
    c = _fields(c, "corpus", CorpusSpec)
    path = c.get("path")
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"corpus.path: expected a file path or null, got {path!r}")
    if path is not None:
        path = _from_launch_dir(path)
    if path is not None and not Path(path).expanduser().is_file():
        raise ConfigError(f"corpus.path: {path!r} is not a readable file (null uses Python's bundled documentation)")
    return CorpusSpec(path=path, heldout_every=_int(c.get("heldout_every", 20), "corpus.heldout_every", 2))


def _train(t: Any, seed: int) -> TrainConfig:
    t = _fields(t, "train", TrainConfig, hidden=("seed",))  # set by the top-level seed, refused below
    if "seed" in t:
        raise ConfigError("train.seed: training uses the top-level seed; set seed=<int> instead")
    for key in ("steps", "batch_size", "seq_len"):
        if key in t:
            _int(t[key], f"train.{key}", 1)
    if "warmup_steps" in t:
        _int(t["warmup_steps"], "train.warmup_steps", 0)
    if "lr" in t:
        _number(t["lr"], "train.lr", 0.0, strict=True)
    if "precision" in t and t["precision"] not in PRECISIONS:
        raise ConfigError(f"train.precision: {t['precision']!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    for key in ("min_lr_ratio", "weight_decay", "grad_clip"):
        if key in t:
            _number(t[key], f"train.{key}", 0.0)
    return TrainConfig.from_dict({**t, "seed": seed})


def _quality(q: Any) -> QualitySpec:
    q = _fields(q, "quality", QualitySpec)
    if not isinstance(q.get("enabled", True), bool):
        raise ConfigError(f"quality.enabled: expected true or false, got {q['enabled']!r}")
    for key in ("n_seqs", "greedy_prompts", "greedy_len"):
        if key in q:
            _int(q[key], f"quality.{key}", 0 if key.startswith("greedy") else 1)
    for key in ("seq_len", "greedy_prompt_len"):
        if key in q:
            _int(q[key], f"quality.{key}", 2)
    spec = QualitySpec(**q)
    _int(spec.decode_positions, "quality.decode_positions", 0)
    if spec.decode_positions >= spec.seq_len:  # at least one position is prefilled
        raise ConfigError(
            f"quality.decode_positions: {spec.decode_positions} is not allowed; allowed: 0..{spec.seq_len - 1} "
            f"(below quality.seq_len={spec.seq_len})"
        )
    return spec


def _threads(value: Any) -> int | None:
    """``auto`` (None) or a thread count this process can actually run in parallel."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= usable:
        raise ConfigError(f"threads: {value!r} is not allowed; allowed: auto, or an integer 1..{usable} (usable CPUs)")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    return value


def _monitor(m: Any) -> MonitorSpec:
    m = _fields(m, "monitor", MonitorSpec)
    interval = _number(m.get("interval_s", 0.05), "monitor.interval_s", 0.001)
    return MonitorSpec(enabled=_bool(m.get("enabled", True), "monitor.enabled"), interval_s=interval)


def _roofline(r: Any) -> RooflineSpec:
    r = _fields(r, "roofline", RooflineSpec)
    peaks = {
        k: _number(r[k], f"roofline.{k}", 0.0, strict=True)
        for k in ("bandwidth_gbs", "tflops")
        if r.get(k) is not None  # null: measured; 0 is refused, not taken for "measure it"
    }
    return RooflineSpec(enabled=_bool(r.get("enabled", True), "roofline.enabled"), **peaks)


def to_container(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain dict of the job config (Hydra's own node excluded), interpolations resolved."""
    data: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":  # Hydra's node holds values only known once a job runs
            continue
        value = cfg[key]
        data[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return data


def validate(cfg: DictConfig | dict[str, Any]) -> PointSpec:
    """Turn a composed config into a PointSpec, or raise ConfigError naming the first bad field."""
    data = to_container(cfg)
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field; allowed: {', '.join(sorted(TOP_LEVEL - {'hydra'}))}")
    for key in GROUPS:
        if not isinstance(data.get(key), dict):
            raise ConfigError(f"{key}: missing config group; set {key}=<option>")
    model = _model(data["model"])
    try:
        engine = make_engine(data["engine"])
    except EngineError as exc:
        raise ConfigError(str(exc)) from None
    try:
        engine.check_model(model.args, model.weights == "trained")
    except ValueError as exc:
        raise ConfigError(f"{exc} (model {model.name!r})") from None
    workload = _workload(data["workload"], model)
    policy = _policy(data["measure"])
    device = resolve_device(data.get("device", "auto"))
    dtype = resolve_dtype(data.get("dtype", "auto"), device)
    seed = _int(data.get("seed", 0), "seed", 0)
    if seed > SEED_MAX:  # prompts and calibration draw generators seeded from it, which take 64-bit seeds
        raise ConfigError(f"seed: must be an integer in 0..{SEED_MAX}, got {seed}")
    if data.get("cache_dir") is not None and not (isinstance(data["cache_dir"], str) and data["cache_dir"].strip()):
        raise ConfigError(f"cache_dir: expected a directory path or null (the default), got {data['cache_dir']!r}")
    if data.get("cache_dir") is not None:
        data["cache_dir"] = _from_launch_dir(data["cache_dir"])
    corpus, train, quality = _corpus(data.get("corpus")), _train(data.get("train"), seed), _quality(data.get("quality"))
    if corpus.path is not None:  # resolved, as cache_dir: an isolated child or a job under chdir reads the same file
        data["corpus"] = {**(data.get("corpus") or {}), "path": corpus.path}
    if model.weights == "trained" and model.args.vocab_size < 256:
        raise ConfigError(
            f"model.weights: 'trained' needs a byte vocabulary (vocab_size >= 256), got {model.args.vocab_size}"
        )
    if model.weights == "trained":
        from harness.corpus_checks import check_corpus_fits  # it loads the corpus (and imports training)

        check_corpus_fits(model, corpus, train, quality, workload)
    elif corpus.path is not None:  # every point loads the corpus it names (calibration, quality): refused up front
        from harness.corpus_checks import check_corpus_loads

        check_corpus_loads(corpus)
    if quality.enabled:
        longest = max(quality.seq_len, quality.greedy_prompt_len + quality.greedy_len)
        if longest > model.args.max_seq_len:
            raise ConfigError(
                f"quality.seq_len: quality windows of {longest} tokens exceed "
                f"model.max_seq_len={model.args.max_seq_len}"
            )
    profile_steps = _int(data.get("profile_steps", 8), "profile_steps", 1)
    profile = ProfileSpec(enabled=_bool(data.get("profile", False), "profile"), steps=profile_steps)
    if profile.enabled:
        # harness/profiling.py keeps the timed cache (prompt_len + gen_len) or, if longer, prompt_len + steps + 1
        size, limit = workload.prompt_len + profile.steps + 1, model.args.max_seq_len
        if size > limit:
            # prompt_len + gen_len <= limit and gen_len >= 2 (checked above) leave room for at least one step
            raise ConfigError(
                f"profile_steps: workload.prompt_len + profile_steps + 1 = {workload.prompt_len} + {profile.steps} "
                f"+ 1 = {size} exceeds model.max_seq_len={limit} of model {model.name!r}; "
                f"allowed: 1..{limit - workload.prompt_len - 1} with workload.prompt_len={workload.prompt_len}"
            )
    # last: a point refused by any check above leaves no cache folder behind
    writable_dir(Path(data.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser(), "cache_dir")
    return PointSpec(
        model, engine, workload, policy, device, dtype, seed, data, corpus, train, quality,
        _monitor(data.get("monitor")), _roofline(data.get("roofline")), profile,
        isolate=_bool(data.get("isolate", False), "isolate"), resume=_bool(data.get("resume", False), "resume"),
        threads=_threads(data.get("threads", "auto")),
    )  # fmt: skip
