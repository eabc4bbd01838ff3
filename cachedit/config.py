"""cachedit configuration: one frozen dataclass, and the only module that reads ``CACHEDIT_*`` variables.

A configuration is resolved once, when a model is compiled (never at import):

    explicit options (``torch.compile(options=...)`` keys or ``enable(..., **overrides)``)
        > a ``CacheditConfig`` object handed in (``options={"config": cfg}``), which replaces env + defaults,
          or a YAML file (``options={"config": "path.yaml"}``), whose keys go over env + defaults
        > ``CACHEDIT_*`` environment variables
        > a YAML file named by ``CACHEDIT_CONFIG``
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
CONFIG_ENV = "CACHEDIT_CONFIG"  # the path of a YAML file of settings


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


@dataclasses.dataclass(frozen=True)
class ListSettings:
    """Per block list settings under ``block_lists="separate"``, e.g. ``{"single_transformer_blocks": {"Fn": 2}}``.

    Each list's decisions use the request's settings with its entry on top (hashable, so the config stays
    frozen). Keys of an entry: ``Fn``, ``Bn`` and the per-request settings, except those that place a call
    or choose the policy (``_NOT_PER_LIST``).
    """

    items: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def for_list(self, path: str) -> dict[str, Any]:
        return dict(dict(self.items).get(path, ()))

    def __bool__(self) -> bool:
        return bool(self.items)


class BlockLists(str, enum.Enum):
    """How a chain of several block lists (FLUX.1's double then single blocks) is cached."""

    JOINED = "joined"  # one state over the lists concatenated (cache-dit's default for FLUX.1)
    SEPARATE = "separate"  # one state per list, each with its own Fn/Bn, threshold and history (FLUX.2 style)


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ScmPolicy(str, enum.Enum):
    """What a 0 bit of a steps-computation mask means."""

    DYNAMIC = "dynamic"  # the usual rules decide (limits, threshold)
    STATIC = "static"  # cache, unconditionally


class Calibrator(str, enum.Enum):
    """What a cached step adds to the fresh head output, per carried stream."""

    NONE = "none"  # the middle residual of the last computed step
    TAYLORSEER = "taylorseer"  # a Taylor forecast from finite differences of computed steps
    FOCA = "foca"
    DMD = "dmd"


class CachePolicy(str, enum.Enum):
    """What is decided per step."""

    DBCACHE = "dbcache"  # one decision for all middle blocks, from the head residual
    DBPRUNE = "dbprune"  # one decision per middle block, from that block's input (the DBPrune split)


class RefreshPolicy(str, enum.Enum):
    """When ``force_refresh_step_hint`` restarts a request's cache state."""

    ONCE = "once"  # at that step only
    REPEAT = "repeat"  # at every multiple of it


SCM_PRESETS = ("slow", "medium", "fast", "ultra")


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
    num_inference_steps: int = 0
    request_idle_seconds: float = 600.0
    max_residual_bytes: int = -1
    scm: str = "none"
    scm_policy: ScmPolicy = ScmPolicy.DYNAMIC
    calibrator: Calibrator = Calibrator.NONE
    taylorseer_order: int = 1
    dmd_history: int = 6
    max_accumulated_residual_diff_threshold: float = 0.0
    budget: float = 0.0
    cfg_diff_compute_separate: bool = True
    force_refresh_step_hint: int = 0
    force_refresh_step_policy: RefreshPolicy = RefreshPolicy.ONCE
    policy: CachePolicy = CachePolicy.DBCACHE
    prune_threshold: float = 0.08
    non_prune_blocks: str = ""  # chain positions DBPrune never prunes, "3,7" (a list of ints is accepted)
    block_lists: BlockLists = BlockLists.JOINED
    list_settings: ListSettings = ListSettings()  # options={"list_settings": {...}}; CACHEDIT_LIST_SETTINGS as JSON

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_field(f.name, getattr(self, f.name), f.name, "CacheditConfig argument")
            object.__setattr__(self, f.name, value)
        if self.budget > 0 and self.scm != "none":
            raise ValueError(f"budget={self.budget} and scm={self.scm!r} both choose the computed steps; set one of them")
        if self.policy is CachePolicy.DBPRUNE:
            if self.budget > 0:
                raise ValueError(
                    f"budget={self.budget} counts computed steps, which policy='dbprune' does not have (it decides per "
                    "block); use budget with policy='dbcache', or scm / prune_threshold with dbprune"
                )
            if self.block_lists is BlockLists.SEPARATE:
                raise ValueError(
                    "block_lists='separate' gives each block list a DBCache state of its own; policy='dbprune' "
                    "decides per block already: use one of them"
                )
            if self.max_accumulated_residual_diff_threshold > 0:
                raise ValueError(
                    f"max_accumulated_residual_diff_threshold={self.max_accumulated_residual_diff_threshold} has no "
                    "effect under policy='dbprune' (cache-dit 1.5.3 accumulates no diff when pruning); unset it"
                )

    @property
    def non_prune_block_set(self) -> frozenset[int]:
        return frozenset(int(b) for b in self.non_prune_blocks.split(",") if b)

    def replace(self, **changes: Any) -> "CacheditConfig":
        return dataclasses.replace(self, **changes)

    def for_request(self, settings: Mapping[str, Any]) -> "CacheditConfig":
        """This configuration with one request's settings (already checked by ``request_settings``)."""
        return dataclasses.replace(self, **settings) if settings else self

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
        if CONFIG_ENV in environ:  # a YAML file under the variables (they override it)
            values.update(cls.from_yaml(environ[CONFIG_ENV], where=f"{CONFIG_ENV}={environ[CONFIG_ENV]!r}"))
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
                continue
            if key not in by_env:
                close = _did_you_mean(key[len(ENV_PREFIX) :], cls.field_names())
                hint = f" Did you mean {ENV_PREFIX + close.upper()}?" if close else ""
                raise ValueError(
                    f"unknown environment variable {key}={raw!r}.{hint} cachedit reads {', '.join(sorted(by_env))}"
                )
            name = by_env[key]
            values[name] = _check_field(name, raw, key, "environment variable")
        return values

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, where: str | None = None) -> dict[str, Any]:
        """The settings of a YAML file (a mapping of option names to values), validated; errors name the
        file and the key. Returns only the keys the file sets, so callers can layer them."""
        where = where or f"{os.fspath(path)!r}"
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{where}: reading a YAML config needs PyYAML: pip install 'cachedit[yaml]'") from None
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as err:
            raise ValueError(f"{where}: cannot read the config file ({err.strerror}); pass an existing YAML file") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{where} is not valid YAML: {err}") from None
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{where} holds a {type(data).__name__}; expected a mapping of cachedit options, e.g. 'threshold: 0.12'"
            )
        names = cls.field_names()
        values = {}
        for key, value in data.items():
            if key not in names:
                close = _did_you_mean(key, names) if isinstance(key, str) else None
                hint = f" Did you mean {close!r}?" if close else ""
                raise ValueError(f"{where}: unknown key {key!r}.{hint} Accepted keys: {', '.join(names)}")
            values[key] = _check_field(key, value, key, f"{where}: YAML key")
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
        environ = os.environ if environ is None else environ
        if isinstance(base, (str, os.PathLike)):  # a YAML file: its keys over the environment
            path = base
            base = cls(**{**cls.from_env(environ), **cls.from_yaml(path, where=f"options['config']={os.fspath(path)!r}")})
        if base is not None and not isinstance(base, CacheditConfig):
            raise TypeError(
                f"options['config'] must be a cachedit.CacheditConfig or the path of a YAML file, got "
                f"{type(base).__name__}; build one with cachedit.CacheditConfig(Fn=..., threshold=...)"
            )
        names = cls.field_names()
        for k, value in options.items():
            if k not in names:
                close = _did_you_mean(k, names) if isinstance(k, str) else None
                hint = f" Did you mean {close!r}?" if close else ""
                raise ValueError(f"unknown cachedit option {k!r}.{hint} Accepted options: {', '.join(names)}")
            options[k] = _check_field(k, value, k, "cachedit option")  # names the option, not the dataclass
        if base is None:
            base = cls(**cls.from_env(environ))
        return dataclasses.replace(base, **options) if options else base


def _field_type(name: str) -> Any:
    return {f.name: f.type for f in dataclasses.fields(CacheditConfig)}[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, value: Any, typ: Any, source: str, where: str = "") -> Any:
    """Convert ``value`` (a string from the environment or a Python value) to the field's type.

    ``source`` is the key as the user wrote it (``Fn``, ``CACHEDIT_FN``) and ``where`` what kind of key it
    is (``"cachedit option"``, ``"environment variable"``), so the first line of an error names both.
    """
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    if isinstance(typ, str):  # enum annotations arrive as strings under `from __future__ import annotations`
        typ = globals()[typ]
    said = f"{where} {source}={value!r}".lstrip()
    example = f"{source}={_example(name, env=source.startswith(ENV_PREFIX))}"
    if typ is str:
        if isinstance(value, (list, tuple)) and value and all(v in (0, 1) for v in value):
            return "".join(str(int(v)) for v in value)  # an explicit mask given as a list
        if not isinstance(value, str):
            raise ValueError(f"{said} is not a string; expected e.g. {example}")
        return value.strip().lower()
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        try:
            return typ(value.lower() if isinstance(value, str) else value)
        except ValueError:
            accepted = ", ".join(repr(m.value) for m in typ)
            raise ValueError(f"{said} is not accepted; expected one of {accepted}") from None
    if typ is InductorOptions:
        return _inductor_options(value, source)
    if typ is ListSettings:
        return _list_settings(value, source, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{said} is not a boolean; expected one of 1/0, true/false, yes/no, on/off")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{said} is not an integer; expected an integer, e.g. {example}")
        try:
            return int(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"{said} is not an integer; expected an integer, e.g. {example}") from None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{said} is not a number; expected a number, e.g. {example}")
        try:
            return float(value.strip()) if isinstance(value, str) else float(value)
        except ValueError:
            raise ValueError(f"{said} is not a number; expected a number, e.g. {example}") from None
    raise AssertionError(f"field {name} has unsupported type {typ!r}")


# Per-request settings a block list may not set for itself: they place a call or choose the policy.
_NOT_PER_LIST = ("cfg", "policy", "prune_threshold", "non_prune_blocks", "force_refresh_step_hint", "force_refresh_step_policy")


def _list_settings(value: Any, source: str, where: str) -> ListSettings:
    """A mapping (or its JSON text) of block list paths to mappings of settings for that list."""
    if isinstance(value, ListSettings):
        return value
    said = f"{where} {source}".lstrip()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as err:
            raise ValueError(f"{said}={value!r} is not JSON ({err}); expected e.g. '{{\"single_transformer_blocks\": {{\"Fn\": 2}}}}'") from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in value.items()):
        raise ValueError(
            f"{said}={value!r} is not a mapping of block list paths to settings; expected e.g. "
            '{"single_transformer_blocks": {"Fn": 2, "threshold": 0.12}}'
        )
    accepted = ("Fn", "Bn") + tuple(k for k in REQUEST_SETTINGS if k not in _NOT_PER_LIST)
    items = []
    for path, settings in sorted(value.items()):
        checked = []
        for key, v in sorted(settings.items()):
            if key not in accepted:
                raise ValueError(f"{said}[{path!r}] has {key!r}, which is not a per-list setting; accepted: {', '.join(accepted)}")
            checked.append((key, _check_field(key, v, f"{source}[{path!r}][{key!r}]", where)))
        items.append((path, tuple(checked)))
    return ListSettings(tuple(items))


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


def _check_range(
    name: str, value: int, *, low: int, hint: str, source: str | None = None, where: str = "", written: Any = None
) -> None:
    """Raise unless ``value >= low``; the error shows ``written`` (what the user typed) when given."""
    if value < low:
        said = f"{where} {source or name}={value if written is None else written!r}".lstrip()
        raise ValueError(f"{said} is out of range; expected an integer >= {low} ({hint})")


# Lower bounds of the integer fields, with how to say "none" or "off" for each.
_LOWER_BOUNDS = {
    "Fn": (1, "at least one block must run on every step to feed the check"),
    "Bn": (0, "use 0 to cache through the last block"),
    "warmup_steps": (0, "use 0 for no warmup"),
    "warmup_interval": (1, "use 1 to warm up on every step"),
    "max_cached_steps": (-1, "use -1 for no limit"),
    "max_continuous_cached_steps": (-1, "use -1 for no limit"),
    "ulysses": (1, "the Ulysses group size; 1 disables Ulysses"),
    "ring": (1, "the ring size; 1 disables Ring attention"),
    "num_inference_steps": (0, "the steps of a detected request; 0: unknown"),
    "max_residual_bytes": (-1, "use -1 for no cap"),
    "taylorseer_order": (1, "TaylorSeer's order, 1 to 3"),
    "dmd_history": (4, "the snapshots DMD fits on; cache-dit's default is 6"),
    "force_refresh_step_hint": (0, "the step at which the cache state restarts; 0: never"),
}


def _check_field(name: str, value: Any, source: str, where: str) -> Any:
    """One field's value, converted and range-checked; errors name ``where`` and ``source`` as written."""
    written = value
    if name == "non_prune_blocks":
        return _block_ids(value, source, where)
    value = _coerce(name, value, _field_type(name), source, where)
    if name in _LOWER_BOUNDS:
        low, hint = _LOWER_BOUNDS[name]
        _check_range(name, value, low=low, hint=hint, source=source, where=where, written=written)
    if name in ("threshold", "prune_threshold") and value != value:  # NaN
        raise ValueError(
            f"{where} {source}={written!r} is NaN; expected a number such as {source}=0.08 (<= 0 never caches)".lstrip()
        )
    if name == "taylorseer_order" and value > 3:
        raise ValueError(f"{where} {source}={written!r} is out of range; expected 1, 2 or 3".lstrip())
    if name == "scm" and not (value in ("none", *SCM_PRESETS) or (value and set(value) <= {"0", "1"})):
        close = difflib.get_close_matches(value, ("none", *SCM_PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{where} {source}={written!r} is not accepted; expected 'none', a preset ({', '.join(SCM_PRESETS)}) "
            f"or one 0/1 per step such as '1111011001' (1 = compute).{hint}".lstrip()
        )
    if name == "budget" and not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{where} {source}={written!r} is out of range; expected the fraction of steps to compute in (0, 1], "
            f"e.g. {source}=0.4, or 0 for no budget".lstrip()
        )
    if name == "max_accumulated_residual_diff_threshold" and value != value:
        raise ValueError(f"{where} {source}={written!r} is NaN; expected a number (<= 0: off)".lstrip())
    if name == "request_idle_seconds" and not value > 0:  # also rejects NaN
        raise ValueError(
            f"{where} {source}={written!r} is out of range; expected seconds > 0 after which an idle detected "
            f"request is dropped, e.g. {source}=600".lstrip()
        )
    return value


def _block_ids(value: Any, source: str, where: str) -> str:
    """Block positions as ``"3,7"``, from such a string or a list of ints."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else value
    ok = isinstance(items, (list, tuple)) and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and (v == "" or v.isdigit()))
        for v in items
    )
    if not ok:
        raise ValueError(
            f"{where} {source}={value!r} is not accepted; expected block positions in the chain (0 = its first "
            f"block), e.g. {source}='3,7' or [3, 7]".lstrip()
        )
    return ",".join(map(str, sorted({int(v) for v in items if v != ""})))


def _example(name: str, env: bool) -> str:
    """The field's default, spelled as a user would write it in an option or an environment variable."""
    default = {f.name: f.default for f in dataclasses.fields(CacheditConfig)}[name]
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return str(int(default)) if env else str(default)
    return str(default)


# cache-dit's DBCache names for the same settings: someone coming from cache-dit types these.
_CACHE_DIT_NAMES = {
    "fn_compute_blocks": "Fn",
    "bn_compute_blocks": "Bn",
    "residual_diff_threshold": "threshold",
    "max_warmup_steps": "warmup_steps",
}


def _did_you_mean(key: str, names: tuple[str, ...]) -> str | None:
    """The field ``key`` was probably meant to be: same letters in another case, an env-var spelling
    (``CACHEDIT_FN``), cache-dit's name for it, or the closest spelling; ``None`` when nothing is close."""
    by_lower = {n.lower(): n for n in names}
    lowered = key.lower()
    if lowered.startswith(ENV_PREFIX.lower()):
        lowered = lowered[len(ENV_PREFIX) :]
    if lowered in by_lower:
        return by_lower[lowered]
    if lowered in _CACHE_DIT_NAMES:
        return _CACHE_DIT_NAMES[lowered]
    close = difflib.get_close_matches(lowered, by_lower, n=1)
    return by_lower[close[0]] if close else None


# Settings a request may change: they steer decisions, not the compiled split (Note [Requests and branches]).
REQUEST_SETTINGS = (
    "threshold",
    "warmup_steps",
    "warmup_interval",
    "max_cached_steps",
    "max_continuous_cached_steps",
    "cfg",
    "scm",
    "scm_policy",
    "calibrator",
    "taylorseer_order",
    "dmd_history",
    "max_accumulated_residual_diff_threshold",
    "budget",
    "cfg_diff_compute_separate",
    "force_refresh_step_hint",
    "force_refresh_step_policy",
    "policy",
    "prune_threshold",
    "non_prune_blocks",
)


def request_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Validate per-request settings (``cachedit.request(model, **settings)``); returns them coerced.

    A setting fixed at compile time (``Fn``, ``inner``, ``ulysses``, ...) is refused with that reason.
    """
    names = CacheditConfig.field_names()
    values: dict[str, Any] = {}
    for key, value in settings.items():
        if key in names and key not in REQUEST_SETTINGS:
            raise ValueError(
                f"{key}={value!r} cannot be set per request: it is fixed when the model is compiled. "
                f"Pass it to torch.compile(options={{{key!r}: ...}}) or CACHEDIT_{key.upper()}; per-request "
                f"settings are {', '.join(REQUEST_SETTINGS)}"
            )
        if key not in names:
            close = _did_you_mean(key, REQUEST_SETTINGS)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ValueError(f"unknown per-request setting {key!r}.{hint} Accepted: {', '.join(REQUEST_SETTINGS)}")
        values[key] = _check_field(key, value, key, "per-request setting")  # the checks of a compile option
    return values
