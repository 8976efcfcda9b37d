"""Typed, validated MBPO configuration, with per-task presets stored as data (``presets/*.toml``).

Every field can be overridden with a dotted ``key=value`` string (``sac.hidden_size=512``), which
is how the CLI's ``--set`` and the pipeline parameters reach it. Validation happens once, before
anything runs, and every error names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is unknown or out of range; the message says which and what is allowed."""


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, choices: tuple | None = None, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EnsembleConfig:
    """Probabilistic dynamics ensemble (jannerm/mbpo ``construct_model``)."""

    ensemble_size: int = _spec(7, lo=1, hi=64, doc="number of Gaussian MLPs")
    num_elites: int = _spec(5, lo=1, hi=64, doc="members used for rollouts (<= ensemble_size)")
    hidden_size: int = _spec(200, lo=1, hi=4096)
    num_hidden_layers: int = _spec(4, lo=1, hi=16)
    weight_decay: tuple[float, ...] = _spec((2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4), lo=0.0, hi=1.0,
                                            doc="L2 per layer, hidden layers then output")
    lr: float = _spec(1e-3, lo=0.0, hi=1.0, lo_open=True)
    batch_size: int = _spec(256, lo=1, hi=1 << 20)
    holdout_ratio: float = _spec(0.2, lo=0.0, hi=0.9, lo_open=True)
    max_holdout: int = _spec(5000, lo=1, hi=1 << 30)
    patience: int = _spec(5, lo=0, hi=10_000, doc="epochs with no >improvement_threshold gain")
    improvement_threshold: float = _spec(0.01, lo=0.0, hi=1.0)
    max_epochs: int = _spec(0, lo=0, hi=1_000_000, doc="0 = until early stopping")
    logvar_bound_coef: float = _spec(0.01, lo=0.0, hi=10.0)
    precision: str = _spec("fp32", choices=("fp32", "bf16"),
                           doc="hidden-layer matrix products in bf16 (fp32 weights, losses and "
                               "output layer) where the processor has bf16 matrix units")


@dataclass(frozen=True)
class RolloutConfig:
    """Branched model rollouts (paper: k-step rollouts from real start states)."""

    schedule: tuple[int, ...] = _spec((20, 150, 1, 15), lo=0, hi=1_000_000,
                                      doc="[epoch_start, epoch_end, length_start, length_end]")
    batch_size: int = _spec(100_000, lo=1, hi=10_000_000, doc="start states per model fit")
    retain_epochs: int = _spec(1, lo=1, hi=1000, doc="epochs of model data kept (FIFO)")


@dataclass(frozen=True)
class SACConfig:
    """Soft Actor-Critic trained mostly on model data."""

    hidden_size: int = _spec(256, lo=1, hi=4096)
    num_hidden_layers: int = _spec(2, lo=1, hi=16)
    lr: float = _spec(3e-4, lo=0.0, hi=1.0, lo_open=True)
    alpha_lr: float = _spec(3e-4, lo=0.0, hi=1.0, lo_open=True)
    gamma: float = _spec(0.99, lo=0.0, hi=1.0)
    tau: float = _spec(5e-3, lo=0.0, hi=1.0)
    batch_size: int = _spec(256, lo=1, hi=1 << 20)
    real_ratio: float = _spec(0.05, lo=0.0, hi=1.0)
    updates_per_step: int = _spec(20, lo=0, hi=10_000, doc="G: gradient steps per env step")
    target_entropy: float = _spec(-1.0, lo=-1000.0, hi=1000.0)
    init_alpha: float = _spec(1.0, lo=0.0, hi=1e6, lo_open=True)
    target_update_interval: int = _spec(1, lo=1, hi=10_000)
    sequential: bool = _spec(False, doc="critic-then-actor updates (pytorch SAC ports) instead of "
                                        "simultaneous ones (softlearning, used by jannerm/mbpo)")
    compile: bool = _spec(False, doc="torch.compile the SAC losses: same math, faster updates "
                                     "after a one-off compile of ~30 s")
    precision: str = _spec("fp32", choices=("fp32", "bf16"),
                           doc="hidden-layer matrix products in bf16 (fp32 weights, losses, Q "
                               "targets and output layers) where the processor has bf16 units")


@dataclass(frozen=True)
class MBPOConfig:
    """One MBPO training run. ``steps_per_round`` env steps make one round (model fit period)."""

    env: str = _spec("Hopper-v5")
    seed: int = _spec(0, lo=0, hi=2**31 - 1)
    init_steps: int = _spec(5000, lo=1, hi=10_000_000, doc="uniform-random steps before training")
    steps_per_round: int = _spec(250, lo=1, hi=1_000_000, doc="env steps between model fits")
    epoch_length: int = _spec(1000, lo=1, hi=1_000_000, doc="env steps per schedule epoch")
    eval_episodes: int = _spec(5, lo=0, hi=1000)
    max_episode_steps: int = _spec(1000, lo=1, hi=1_000_000)
    real_buffer_size: int = _spec(1_000_000, lo=1, hi=100_000_000, doc="real transitions kept")
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sac: SACConfig = field(default_factory=SACConfig)

    def __post_init__(self) -> None:
        validate(self)

    # -- derived quantities -------------------------------------------------------------------
    def rollout_length(self, env_steps: int) -> int:
        """Rollout length k at ``env_steps``: linear in epochs from k0 at e0 to k1 at e1.

        As the original's ``_set_rollout_length``: the epoch is the whole number of epochs
        completed since the random warm-up ended (not a fraction), so k steps up only at an
        epoch's first fit."""
        e0, e1, k0, k1 = self.rollout.schedule
        epoch = max(0, env_steps - self.init_steps) // self.epoch_length
        if epoch <= e0:
            return k0
        frac = 1.0 if e1 == e0 else min((epoch - e0) / (e1 - e0), 1.0)
        return int(frac * (k1 - k0) + k0)

    def model_buffer_capacity(self, rollout_length: int) -> int:
        """Model pool size (jannerm/mbpo ``_set_rollout_length``): kept epochs x k x rollouts/epoch."""
        rollouts_per_epoch = self.rollout.batch_size * self.epoch_length / self.steps_per_round
        return max(1, int(self.rollout.retain_epochs * rollout_length * rollouts_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for experiment trackers."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MBPOConfig:
        return _build(cls, data, prefix="")


_SECTIONS = {"ensemble": EnsembleConfig, "rollout": RolloutConfig, "sac": SACConfig}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; allowed: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS and cls is MBPOConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table of keys, got {value!r}")
            kwargs[name] = _build(_SECTIONS[name], value, prefix=f"{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hints[name])
    if cls is MBPOConfig:
        return cls(**kwargs)
    obj = cls(**kwargs)
    _validate_fields(obj, prefix)
    return obj


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert TOML/JSON/CLI values to the field's type, refusing lossy conversions."""
    origin = get_origin(hint)
    if origin is tuple:
        (inner, _) = get_args(hint)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list of {inner.__name__}")
        return tuple(_coerce(key, v, inner) for v in value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                fv = float(value)
                if not fv.is_integer():
                    raise ValueError
                return int(fv)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported type {hint}")
    raise ConfigError(f"{key} = {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _check_number(key: str, value: Any, meta: dict[str, Any]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r} must be a finite number")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return
    bad = (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or (
        hi is not None and value > hi)
    if bad:
        left = "(" if meta.get("lo_open") else "["
        raise ConfigError(f"{key} = {value!r} is out of range; allowed {left}{lo}, {hi}]")


def _validate_fields(obj: Any, prefix: str) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        if f.name in _SECTIONS and isinstance(obj, MBPOConfig):
            continue
        key, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        expected = get_origin(hint) or hint
        if expected is tuple:
            if not isinstance(value, tuple):
                raise ConfigError(f"{key} = {value!r} must be a list")
            inner = get_args(hint)[0]
            for v in value:
                if not isinstance(v, inner) or (inner is int and isinstance(v, bool)):
                    raise ConfigError(f"{key} = {value!r} must contain only {inner.__name__} values")
                _check_number(key, v, f.metadata)
        else:
            ok = isinstance(value, expected) and not (expected in (int, float)
                                                      and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ConfigError(f"{key} = {value!r} must be a {expected.__name__}")
            if expected in (int, float):
                _check_number(key, value, f.metadata)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{key} = {value!r} is not allowed; allowed: "
                                  f"{', '.join(map(str, choices))}")


def validate(cfg: MBPOConfig) -> None:
    """Field ranges, then the constraints that tie fields together."""
    from .envs import SUPPORTED_ENVS  # local import: envs imports gymnasium

    _validate_fields(cfg, "")
    for name, section_cls in _SECTIONS.items():
        section = getattr(cfg, name)
        if not isinstance(section, section_cls):
            raise ConfigError(f"{name} must be a {section_cls.__name__}, got {type(section).__name__}")
        _validate_fields(section, f"{name}.")
    if cfg.env not in SUPPORTED_ENVS:
        raise ConfigError(f"env = {cfg.env!r} is not supported; allowed: {', '.join(SUPPORTED_ENVS)}")
    ens, ro = cfg.ensemble, cfg.rollout
    if ens.num_elites > ens.ensemble_size:
        raise ConfigError(f"ensemble.num_elites = {ens.num_elites} must be <= ensemble.ensemble_size "
                          f"= {ens.ensemble_size}")
    if len(ens.weight_decay) != ens.num_hidden_layers + 1:
        raise ConfigError(f"ensemble.weight_decay = {list(ens.weight_decay)} must have "
                          f"num_hidden_layers + 1 = {ens.num_hidden_layers + 1} entries")
    if len(ro.schedule) != 4:
        raise ConfigError(f"rollout.schedule = {list(ro.schedule)} must be [epoch_start, epoch_end, "
                          "length_start, length_end]")
    e0, e1, k0, k1 = ro.schedule
    if e1 < e0:
        raise ConfigError(f"rollout.schedule = {list(ro.schedule)} is out of order; allowed: "
                          "epoch_start <= epoch_end")
    if min(k0, k1) < 1:
        raise ConfigError(f"rollout.schedule = {list(ro.schedule)}: rollout lengths must be >= 1")


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mbpo_core.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(env_id: str) -> dict[str, Any]:
    """The preset for ``env_id`` as a plain dict (the paper's hyperparameters for that task)."""
    if env_id not in available_presets():
        raise ConfigError(f"env = {env_id!r} has no preset; allowed: {', '.join(available_presets())}")
    text = resources.files("mbpo_core.presets").joinpath(f"{env_id}.toml").read_text()
    return tomllib.loads(text)


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["sac.hidden_size=512", "seed=3"]`` -> nested dict; values stay strings until coerced."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. sac.hidden_size=512)")
        key, value = pair.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] in _SECTIONS:
                raise ConfigError(f"override {pair!r}: {parts[0]} is a section; set {parts[0]}.<key>")
            nested[parts[0]] = value.strip()
        elif len(parts) == 2 and parts[0] in _SECTIONS:
            nested.setdefault(parts[0], {})[parts[1]] = value.strip()
        else:
            raise ConfigError(f"unknown key {key}; allowed sections: {', '.join(_SECTIONS)} "
                              "or a top-level key")
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def make_config(env_id: str, overrides: list[str] | tuple[str, ...] = (), **top: Any) -> MBPOConfig:
    """Preset for ``env_id`` + keyword fields + ``key=value`` overrides, validated."""
    data = _merge(load_preset(env_id), {k: v for k, v in top.items() if v is not None})
    data = _merge(data, parse_overrides(list(overrides)))
    if data.get("env", env_id) != env_id:
        raise ConfigError(f"env = {data['env']!r} conflicts with the preset {env_id!r}; "
                          "choose the task with --env")
    data["env"] = env_id
    return MBPOConfig.from_dict(data)
