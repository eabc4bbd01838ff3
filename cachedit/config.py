"""cachedit configuration: one frozen dataclass, and the only module that reads ``CACHEDIT_*`` variables.

A configuration is resolved once, when a model is compiled (never at import):

    explicit options (``torch.compile(options=...)`` keys or ``enable(..., **overrides)``)
        > a ``CacheditConfig`` object handed in (``options={"config": cfg}``), which replaces env + defaults
        > ``CACHEDIT_*`` environment variables
        > defaults (cache-dit 1.5.3 DBCache: F8 B0, threshold 0.08, 8 warmup steps)
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "CACHEDIT_"


class CfgMode(str, enum.Enum):
    """How classifier-free guidance reaches the transformer."""

    AUTO = "auto"  # two consecutive calls with the same timestep are a cond/uncond pair
    BATCHED = "batched"  # cond and uncond in one batch: one branch, one decision
    SEPARATE = "separate"  # two calls per step, each branch keeps its own state


class Inner(str, enum.Enum):
    """The compiler that lowers each part of the split graph."""

    INDUCTOR = "inductor"
    EAGER = "eager"
    AOT_EAGER = "aot_eager"


class CompileMode(str, enum.Enum):
    """torch.compile's ``mode``, applied to every part when the inner compiler is Inductor."""

    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"  # CUDA graphs (Note [Stored outputs under CUDA graphs] in backend.py)
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


@dataclasses.dataclass(frozen=True)
class InductorOptions:
    """Inductor config patches for the parts, e.g. ``{"max_autotune": True}`` (hashable, so the config stays frozen).

    Keys are checked against ``torch._inductor.config`` when the config is built.
    """

    items: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclasses.dataclass(frozen=True)
class CacheditConfig:
    """Step-cache (DBCache) settings plus how the parts are compiled.

    Field names follow cache-dit's DBCache where they exist (``Fn``/``Bn`` compute blocks,
    ``threshold`` = residual_diff_threshold); -1 means "no limit" for the two step limits.
    """

    Fn: int = 8
    Bn: int = 0
    threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    cfg: CfgMode = CfgMode.AUTO
    ulysses: int = 1
    ring: int = 1
    fp8_comm: bool = False
    inner: Inner = Inner.INDUCTOR
    mode: CompileMode = CompileMode.DEFAULT  # also torch.compile(..., mode=...) when options= is not given
    inductor: InductorOptions = InductorOptions()  # options={"inductor": {...}}; CACHEDIT_INDUCTOR as JSON
    disable: bool = False
    log: LogLevel = LogLevel.WARNING

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(f.name, value, f.type, f"CacheditConfig.{f.name}"))
        _check_range("Fn", self.Fn, low=1, hint="at least one block must run on every step to feed the check")
        _check_range("Bn", self.Bn, low=0, hint="use 0 to cache through the last block")
        _check_range("warmup_steps", self.warmup_steps, low=0, hint="use 0 for no warmup")
        _check_range("warmup_interval", self.warmup_interval, low=1, hint="use 1 to warm up on every step")
        _check_range("max_cached_steps", self.max_cached_steps, low=-1, hint="use -1 for no limit")
        _check_range(
            "max_continuous_cached_steps", self.max_continuous_cached_steps, low=-1, hint="use -1 for no limit"
        )
        _check_range("ulysses", self.ulysses, low=1, hint="the Ulysses group size; 1 disables Ulysses")
        _check_range("ring", self.ring, low=1, hint="the ring size; 1 disables Ring attention")
        if self.threshold != self.threshold:  # NaN
            raise ValueError("CacheditConfig.threshold is NaN; expected a float such as 0.08 (<= 0 never caches)")

    def replace(self, **changes: Any) -> "CacheditConfig":
        return dataclasses.replace(self, **changes)

    @property
    def warmup_step_set(self) -> frozenset[int]:
        """Steps that always compute: ``range(0, warmup_steps, warmup_interval)`` (cache-dit semantics)."""
        return frozenset(range(0, self.warmup_steps, self.warmup_interval))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """Parse the ``CACHEDIT_*`` variables of ``environ`` into validated field values (pure).

        Returns only the fields that are set, so callers can layer them. Unknown ``CACHEDIT_*`` names
        raise, since a typo there would otherwise silently run with defaults.
        """
        by_env = {ENV_PREFIX + name.upper(): name for name in cls.field_names()}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            if key not in by_env:
                close = difflib.get_close_matches(key, by_env, n=1)
                hint = f" Did you mean {close[0]}?" if close else ""
                raise ValueError(
                    f"unknown environment variable {key}={raw!r}; cachedit reads {', '.join(sorted(by_env))}.{hint}"
                )
            name = by_env[key]
            values[name] = _coerce(name, raw, _field_type(name), key)
        # Validate now so the error names the variable, not a later dataclass call.
        for name, value in values.items():
            try:
                cls(**{name: value})
            except ValueError as err:
                raise ValueError(f"{ENV_PREFIX + name.upper()}={environ[ENV_PREFIX + name.upper()]!r}: {err}") from None
        return values

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> "CacheditConfig":
        """explicit options > ``options["config"]`` > environment > defaults.

        ``environ`` defaults to ``os.environ``, read here when a model is compiled and nowhere else.
        """
        options = dict(options or {})
        base = options.pop("config", None)
        if base is not None and not isinstance(base, CacheditConfig):
            raise TypeError(
                f"options['config'] must be a cachedit.CacheditConfig, got {type(base).__name__}; "
                "build one with cachedit.CacheditConfig(Fn=..., threshold=...)"
            )
        names = cls.field_names()
        unknown = [k for k in options if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown cachedit option {k!r}; accepted options: {', '.join(names)}.{hint}")
        if base is None:
            base = cls(**cls.from_env(os.environ if environ is None else environ))
        return dataclasses.replace(base, **options) if options else base


def _field_type(name: str) -> Any:
    return {f.name: f.type for f in dataclasses.fields(CacheditConfig)}[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, value: Any, typ: Any, source: str) -> Any:
    """Convert ``value`` (a string from the environment or a Python value) to the field's type."""
    typ = {"int": int, "float": float, "bool": bool}.get(typ, typ) if isinstance(typ, str) else typ
    if isinstance(typ, str):  # enum annotations arrive as strings under `from __future__ import annotations`
        typ = globals()[typ]
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        try:
            return typ(value.lower() if isinstance(value, str) else value)
        except ValueError:
            accepted = ", ".join(repr(m.value) for m in typ)
            raise ValueError(f"{source}={value!r} is not accepted; expected one of {accepted}") from None
    if typ is InductorOptions:
        return _inductor_options(value, source)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{source}={value!r} is not a boolean; expected one of 1/0, true/false, yes/no, on/off")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{source}={value!r} is not an integer; expected e.g. {source}=8")
        try:
            return int(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"{source}={value!r} is not an integer; expected e.g. {source}=8") from None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{source}={value!r} is not a number; expected e.g. {source}=0.08")
        try:
            return float(value.strip()) if isinstance(value, str) else float(value)
        except ValueError:
            raise ValueError(f"{source}={value!r} is not a number; expected e.g. {source}=0.08") from None
    raise AssertionError(f"field {name} has unsupported type {typ!r}")


def _inductor_options(value: Any, source: str) -> InductorOptions:
    """A mapping (or its JSON text, from the environment) of Inductor config names to values."""
    if isinstance(value, InductorOptions):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as err:
            raise ValueError(
                f"{source}={value!r} is not JSON ({err}); expected an object such as "
                f'{source}=\'{{"max_autotune": true}}\''
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(
            f"{source}={value!r} is not a mapping of Inductor option names to values; expected e.g. "
            '{"max_autotune": True, "epilogue_fusion": False} (see torch._inductor.list_options())'
        )
    if value:
        from torch._inductor import config as inductor_config  # only when options are given: a heavy import

        known = inductor_config.get_config_copy()
        for key in value:
            if key.replace("-", "_") not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"{source} has {key!r}, which is not an Inductor option; accepted names are those of "
                    f"torch._inductor.list_options().{hint}"
                )
    return InductorOptions(tuple(sorted((k.replace("-", "_"), v) for k, v in value.items())))


def _check_range(name: str, value: int, *, low: int, hint: str) -> None:
    if value < low:
        raise ValueError(f"CacheditConfig.{name}={value} is out of range; expected an integer >= {low} ({hint})")
