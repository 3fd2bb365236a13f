"""The system configuration (`sys.yaml`): schema, defaults and validation.

`load_config` turns a path, a mapping or ``None`` (all defaults) into an
immutable `Config`. Every key has a default; every rule raises
`erllama_py.errors.ConfigError` naming the full key path and the reason, for
example ``cache.tiers[1].quota_mb: must be a positive integer, got -5``.

Validation is structural here (types, ranges, cross-field rules, unknown
keys). Checks that touch the machine, such as creating a tier root, run when
the supervisor that owns the section starts (`check_tier_roots`); both fail
start-up, never warn at run time.

Units are in the key names: ``*_mb`` mebibytes, ``*_s`` seconds, ``*_ms``
milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from erllama_py.errors import ConfigError
from erllama_py.kinds import TierKind

__all__ = [
    "CacheSettings",
    "Config",
    "DaemonSettings",
    "ModelSettings",
    "PressureSettings",
    "RaySettings",
    "RestartSettings",
    "SavePolicy",
    "ServerSettings",
    "TierKind",
    "TierSettings",
    "check_tier_roots",
    "load_config",
    "parse_config",
    "parse_model",
    "validate_policy",
]

TIER_KINDS: tuple[str, ...] = tuple(k.value for k in TierKind)
MB = 1024 * 1024

# Defaults, one per line, with their unit.
DEFAULT_INTENSITY = 5  # restarts ...
DEFAULT_PERIOD_S = 30.0  # ... within this many seconds, then escalate
DEFAULT_MODEL_INTENSITY = 3  # context worker restarts ...
DEFAULT_MODEL_PERIOD_S = 60.0  # ... within this many seconds, then the model is failed
DEFAULT_RAM_QUOTA_MB = 2048
DEFAULT_RAM_FILE_QUOTA_MB = 1024
DEFAULT_DISK_QUOTA_MB = 8192
DEFAULT_WRITERS = 2  # concurrent saves
DEFAULT_RESERVATION_TTL_S = 60.0
DEFAULT_SWEEP_INTERVAL_S = 30.0
DEFAULT_N_CTX = 4096  # tokens
DEFAULT_N_BATCH = 512  # tokens per llama_decode
DEFAULT_N_SEQ_MAX = 4  # concurrent sequences per context
DEFAULT_PRESSURE_INTERVAL_MS = 5000
DEFAULT_HIGH_WATERMARK = 0.85
DEFAULT_LOW_WATERMARK = 0.75
DEFAULT_MIN_EVICT_BYTES = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 64  # waiting requests per model before 429
DEFAULT_DEADLINE_FLOOR_S = 120.0  # a worker call is never taken as hung sooner than this
DEFAULT_DEADLINE_FACTOR = 20.0  # times the time the call's work should take at measured speed
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_MAX_BODY_MB = 64  # a request body over this is refused (413)
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # running requests may finish this long on a stop
DEFAULT_LOG_MAX_MB = 16  # the daemon's log is rotated past this size ...
DEFAULT_LOG_BACKUPS = 3  # ... keeping this many old logs
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with its NUL
DEFAULT_RAY_REPLICAS = 2  # Ray Serve replicas, each a whole runtime
DEFAULT_RAY_MAX_ONGOING = 8  # requests in flight per replica before Serve queues them
DEFAULT_AFFINITY_BLOCK_CHARS = 256  # prompt characters per affinity block
DEFAULT_AFFINITY_MAX_BLOCKS = 64  # blocks hashed per request (the rest does not steer)
DEFAULT_IMBALANCE = 4  # queue-length gap past which the least-loaded replica wins


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "erllama-py"


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "erllama-py"
    return Path(f"/tmp/erllama-py-{os.getuid()}")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "erllama-py"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SavePolicy:
    """A validated save policy; construction checks every rule.

    Raises:
        ConfigError: a field breaks a rule; the key is ``policy.<field>``
            (use :func:`validate_policy` for another key path).
    """

    # The defaults are those of the shipped sys.yaml (one set of defaults; a test checks
    # they agree). erllama's own are 512, 512, 30000, 2048, 32, 2048, 500: with them a
    # prompt shorter than 512 tokens is never cached.
    min_tokens: int | None = 64  # tokens; floor of every gated save; None = never save
    cold_min_tokens: int = 64  # tokens; shortest prompt that gets a cold save
    cold_max_tokens: int = 30000  # tokens; longest prompt that gets a cold save
    continued_interval: int = 512  # tokens generated between continued saves
    boundary_trim_tokens: int = 0  # tokens dropped from a cold save's tail before aligning
    boundary_align_tokens: int = 1  # tokens; cold-save alignment and longest-prefix stride
    session_resume_wait_ms: int = 500  # ms to wait for an in-flight save of a parent key

    def __post_init__(self) -> None:
        _check_values({f.name: getattr(self, f.name) for f in fields(self)}, "policy")

    @property
    def saves_enabled(self) -> bool:
        """False when ``min_tokens`` is None: no gated save ever fires."""
        return self.min_tokens is not None


_FIELD_NAMES = tuple(f.name for f in fields(SavePolicy))
# The smallest value each field accepts; None is also accepted where listed.
_MINIMUMS = {
    "min_tokens": 0,
    "cold_min_tokens": 0,
    "cold_max_tokens": 0,
    "continued_interval": 1,
    "boundary_trim_tokens": 0,
    "boundary_align_tokens": 1,
    "session_resume_wait_ms": 0,
}
_NULLABLE = frozenset({"min_tokens"})


def _check_field(name: str, value: object, prefix: str) -> None:
    if value is None and name in _NULLABLE:
        return
    minimum = _MINIMUMS[name]
    bound = "> 0" if minimum == 1 else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}.{name}", f"must be an integer {bound}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}.{name}", f"must be {bound}, got {value}")


def _check_values(values: Mapping[str, Any], prefix: str) -> None:
    for name in _FIELD_NAMES:
        _check_field(name, values[name], prefix)
    min_tokens, cold_min, cold_max = (
        values["min_tokens"],
        values["cold_min_tokens"],
        values["cold_max_tokens"],
    )
    if min_tokens is not None and cold_min < min_tokens:
        reason = f"must be >= min_tokens ({min_tokens}), got {cold_min}"
        raise ConfigError(f"{prefix}.cold_min_tokens", reason)
    if cold_max < cold_min:
        reason = f"must be >= cold_min_tokens ({cold_min}), got {cold_max}"
        raise ConfigError(f"{prefix}.cold_max_tokens", reason)


def validate_policy(value: object, key_prefix: str = "policy") -> SavePolicy:
    """Build a :class:`SavePolicy` from a mapping (missing keys take defaults).

    A :class:`SavePolicy` is returned as is and ``None`` gives the defaults.
    Rules: every field is an int (a bool is not) >= 0; ``min_tokens`` may be
    None; ``continued_interval`` and ``boundary_align_tokens`` are > 0;
    ``cold_min_tokens >= min_tokens``; ``cold_max_tokens >= cold_min_tokens``.

    Raises:
        ConfigError: with the full key path, e.g.
            ``policy.cold_min_tokens: must be >= min_tokens (512), got 100``;
            also for an unknown key or a value that is not a mapping.
    """
    if value is None:
        return SavePolicy()
    if isinstance(value, SavePolicy):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(key_prefix, f"must be a mapping, got {type(value).__name__}")
    for name in value:
        if name not in _FIELD_NAMES:
            known = ", ".join(_FIELD_NAMES)
            raise ConfigError(f"{key_prefix}.{name}", f"unknown key (known keys: {known})")
    defaults = SavePolicy()
    merged = {name: value.get(name, getattr(defaults, name)) for name in _FIELD_NAMES}
    _check_values(merged, key_prefix)
    return SavePolicy(**merged)


@dataclass(frozen=True)
class RestartSettings:
    """Restart intensity of a supervisor: more than `intensity` in `period_s` escalates."""

    intensity: int = DEFAULT_INTENSITY
    period_s: float = DEFAULT_PERIOD_S


@dataclass(frozen=True)
class TierSettings:
    """One cache tier. ``root`` is None for the RAM tier and required otherwise."""

    kind: TierKind
    quota_bytes: int
    root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TierKind(self.kind))  # a plain "ram" is accepted

    @property
    def name(self) -> str:
        """The tier's name in rows and counters: ``ram``, ``ram_file:<root>``, ``disk:<root>``."""
        return self.kind.value if self.root is None else f"{self.kind.value}:{self.root}"


@dataclass(frozen=True)
class CacheSettings:
    """The KV cache: its tiers (fastest first) and its writer pool."""

    tiers: tuple[TierSettings, ...] = ()
    writers: int = DEFAULT_WRITERS
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S
    sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S
    promote_on_hit: bool = True
    demote_on_evict: bool = True
    verify_on_scan: bool = False
    restart: RestartSettings = field(default_factory=RestartSettings)

    def tier(self, name: str) -> TierSettings | None:
        """The tier called `name` (``ram``, ``disk``, ``disk:<root>``), or None."""
        for tier in self.tiers:
            if name in (tier.name, tier.kind):
                return tier
        return None


@dataclass(frozen=True)
class ModelSettings:
    """A model to load at start (``models:`` in sys.yaml)."""

    name: str
    model: str | None = None
    model_path: Path | None = None
    backend: Literal["llama", "stub"] = "llama"
    n_ctx: int = DEFAULT_N_CTX
    n_batch: int = DEFAULT_N_BATCH
    n_seq_max: int = DEFAULT_N_SEQ_MAX
    n_threads: int | None = None
    tier: str = "ram"
    deterministic: bool = False
    policy: SavePolicy = field(default_factory=SavePolicy)
    restart: RestartSettings = field(
        default_factory=lambda: RestartSettings(DEFAULT_MODEL_INTENSITY, DEFAULT_MODEL_PERIOD_S)
    )
    fingerprint: bytes | None = None
    stub: Mapping[str, int | float] = field(default_factory=dict)
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a sequence; more are refused
    # A worker call that takes longer than max(floor, factor x its tokens x the measured
    # time per token) is taken as hung: the worker is killed and restarted.
    deadline_floor_s: float = DEFAULT_DEADLINE_FLOOR_S
    deadline_factor: float = DEFAULT_DEADLINE_FACTOR


@dataclass(frozen=True)
class PressureSettings:
    """The memory-pressure poller (off by default)."""

    enabled: bool = False
    source: Literal["system", "noop"] = "system"
    interval_ms: int = DEFAULT_PRESSURE_INTERVAL_MS
    high_watermark: float = DEFAULT_HIGH_WATERMARK
    low_watermark: float = DEFAULT_LOW_WATERMARK
    min_evict_bytes: int = DEFAULT_MIN_EVICT_BYTES
    evict_tiers: tuple[TierKind, ...] = (TierKind.RAM, TierKind.RAM_FILE)


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP server (``erllama-py serve`` and the daemon).

    ``port`` 0 picks a free port. With ``api_keys`` every path but ``/health*``
    needs one (``Authorization: Bearer <key>``). ``request_timeout_s`` bounds each
    request (504 past it); ``shutdown_timeout_s`` is how long running requests
    may finish on a graceful stop before they are cancelled (and saved).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * MB
    cors_origins: tuple[str, ...] = ()
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def __repr__(self) -> str:  # never print the keys
        keys = f"<{len(self.api_keys)} keys>"
        return (
            f"ServerSettings(host={self.host!r}, port={self.port}, api_keys={keys}, "
            f"request_timeout_s={self.request_timeout_s}, max_body_bytes={self.max_body_bytes}, "
            f"cors_origins={self.cors_origins!r}, shutdown_timeout_s={self.shutdown_timeout_s})"
        )


@dataclass(frozen=True)
class DaemonSettings:
    """Files of the CLI daemon: its pid file and control socket live in the user's runtime
    folder ($XDG_RUNTIME_DIR/erllama-py, else /tmp/erllama-py-$UID), its log in the state
    folder ($XDG_STATE_HOME/erllama-py, else ~/.local/state/erllama-py)."""

    pid_file: Path = field(default_factory=lambda: _runtime_dir() / "erllama-py.pid")
    log_file: Path = field(default_factory=lambda: _state_dir() / "erllama-py.log")
    log_max_bytes: int = DEFAULT_LOG_MAX_MB * MB
    log_backups: int = DEFAULT_LOG_BACKUPS
    control_socket: Path = field(default_factory=lambda: _runtime_dir() / "control.sock")


@dataclass(frozen=True)
class RaySettings:
    """Scale-out on Ray Serve (``erllama-py serve --ray``, the optional ``ray`` extra).

    Each replica is a whole runtime; ``router`` ``affinity`` sends a request to the
    replica most likely to hold its longest cached prefix (blocks of
    ``affinity_block_chars`` characters of the rendered prompt, at most
    ``affinity_max_blocks`` of them) unless that replica's queue is longer than the
    shortest by more than ``imbalance_threshold``; ``default`` is Ray's
    power-of-two-choices router. File tier roots may contain ``{node}`` (the Ray node
    id); each replica adds ``slot-N`` (a slot it locks on its node) so that a
    restarted replica finds its rows again.
    """

    address: str | None = None  # None starts a local Ray; "auto" joins a running cluster
    replicas: int = DEFAULT_RAY_REPLICAS
    num_cpus_per_replica: float = 1.0
    resources_per_replica: Mapping[str, float] = field(default_factory=dict)
    max_ongoing_requests: int = DEFAULT_RAY_MAX_ONGOING
    router: Literal["affinity", "default"] = "affinity"
    affinity_block_chars: int = DEFAULT_AFFINITY_BLOCK_CHARS
    affinity_max_blocks: int = DEFAULT_AFFINITY_MAX_BLOCKS
    imbalance_threshold: int = DEFAULT_IMBALANCE
    app_name: str = "erllama-py"


DEFAULT_RAM_FILE_ROOT = Path("/dev/shm/erllama-py")  # tmpfs


def _default_tiers() -> tuple[TierSettings, ...]:
    """The tiers of the shipped sys.yaml (a test holds the two equal)."""
    return (
        TierSettings(TierKind.RAM, DEFAULT_RAM_QUOTA_MB * MB),
        TierSettings(TierKind.RAM_FILE, DEFAULT_RAM_FILE_QUOTA_MB * MB, DEFAULT_RAM_FILE_ROOT),
        TierSettings(TierKind.DISK, DEFAULT_DISK_QUOTA_MB * MB, _cache_dir() / "kvc"),
    )


@dataclass(frozen=True)
class Config:
    """The whole system configuration, immutable."""

    restart: RestartSettings = field(default_factory=RestartSettings)
    cache: CacheSettings = field(default_factory=lambda: CacheSettings(tiers=_default_tiers()))
    policy: SavePolicy = field(default_factory=SavePolicy)
    models: tuple[ModelSettings, ...] = ()
    pressure: PressureSettings = field(default_factory=PressureSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    ray: RaySettings = field(default_factory=RaySettings)


# --------------------------------------------------------------------------- reader

T = TypeVar("T")


def _describe(value: object) -> str:
    return repr(value)


class _Section:
    """Reads one mapping at a key path; `done()` rejects keys nobody asked for."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(path or "<root>", f"must be a mapping, got {_describe(raw)}")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(path or "<root>", f"keys must be strings, got {key!r}")
        self.raw: Mapping[str, object] = raw
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.raw and self.raw[name] is not None

    def get(self, name: str) -> object:
        self.seen.add(name)
        return self.raw.get(name)

    def get_int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(self.key(name), f"must be {what}, got {value}")
        return value

    def optional_int(self, name: str, *, minimum: int) -> int | None:
        if not self.has(name):
            self.seen.add(name)
            return None
        return self.get_int(name, minimum, minimum=minimum)

    def get_float(self, name: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None, strict_minimum: bool = False) -> float:  # fmt: skip
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, got {_describe(value)}")
        number = float(value)
        if minimum is not None and (number <= minimum if strict_minimum else number < minimum):
            bound = f"> {minimum:g}" if strict_minimum else f">= {minimum:g}"
            raise ConfigError(self.key(name), f"must be {bound}, got {value}")
        if maximum is not None and number > maximum:
            raise ConfigError(self.key(name), f"must be <= {maximum:g}, got {value}")
        return number

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {_describe(value)}")
        return value

    def get_str(self, name: str, default: str | None) -> str | None:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"must be a non-empty string, got {_describe(value)}")
        return value

    def choice(self, name: str, default: T, choices: Sequence[T]) -> T:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            options = ", ".join(str(c) for c in choices)
            raise ConfigError(self.key(name), f"must be one of {options}, got {_describe(value)}")
        return value  # type: ignore[return-value]

    def path_value(self, name: str, default: Path | None) -> Path | None:
        raw = self.raw.get(name)
        if isinstance(raw, os.PathLike):
            self.seen.add(name)
            return Path(raw)
        value = self.get_str(name, None)
        if value is None:
            return default
        return Path(os.path.expandvars(os.path.expanduser(value)))

    def get_list(self, name: str) -> list[object]:
        value = self.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be a list, got {_describe(value)}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise ConfigError(self.key(unknown[0]), f"unknown key (known keys: {known})")


# --------------------------------------------------------------------------- sections


def _restart(raw: object, path: str, default: RestartSettings) -> RestartSettings:
    s = _Section(raw, path)
    settings = RestartSettings(
        intensity=s.get_int("intensity", default.intensity, minimum=0),
        period_s=s.get_float("period_s", default.period_s, minimum=0.0, strict_minimum=True),
    )
    s.done()
    return settings


def _tier(raw: object, path: str) -> TierSettings:
    s = _Section(raw, path)
    kind = s.get("kind")
    if kind is None:
        raise ConfigError(s.key("kind"), f"is required (one of {', '.join(TIER_KINDS)})")
    kind = TierKind(s.choice("kind", "ram", TIER_KINDS))
    default_quota = {
        "ram": DEFAULT_RAM_QUOTA_MB,
        "ram_file": DEFAULT_RAM_FILE_QUOTA_MB,
        "disk": DEFAULT_DISK_QUOTA_MB,
    }[kind]
    quota_mb = s.get_int("quota_mb", default_quota, minimum=1)
    root = s.path_value("root", None)
    if kind == "ram" and root is not None:
        raise ConfigError(s.key("root"), "the ram tier has no root; remove it")
    if kind != "ram" and root is None:
        raise ConfigError(s.key("root"), f"is required for a {kind} tier")
    s.done()
    return TierSettings(kind=kind, quota_bytes=quota_mb * MB, root=root)


def _check_tiers(tiers: Sequence[TierSettings]) -> None:
    """At most one RAM tier, and no two file tiers on one folder or one inside another
    (both would index the same files and delete each other's)."""
    ram: int | None = None
    roots: list[tuple[int, Path]] = []
    for i, tier in enumerate(tiers):
        if tier.root is None:
            if ram is not None:
                raise ConfigError(
                    f"cache.tiers[{i}].kind", f"at most one ram tier (cache.tiers[{ram}] is one)"
                )
            ram = i
            continue
        root = Path(os.path.realpath(tier.root))
        for j, other in roots:
            if root == other:
                why = f"is the folder of cache.tiers[{j}] ({other}); each tier needs its own"
            elif root.is_relative_to(other):
                why = f"{root} is inside the root of cache.tiers[{j}] ({other})"
            elif other.is_relative_to(root):
                why = f"{root} holds the root of cache.tiers[{j}] ({other})"
            else:
                continue
            raise ConfigError(f"cache.tiers[{i}].root", why)
        roots.append((i, root))


def _cache(raw: object) -> CacheSettings:
    s = _Section(raw, "cache")
    if s.has("tiers"):
        items = s.get_list("tiers")
        if not items:
            raise ConfigError("cache.tiers", "must list at least one tier")
        tiers = tuple(_tier(item, f"cache.tiers[{i}]") for i, item in enumerate(items))
    else:
        s.get("tiers")
        tiers = _default_tiers()
    _check_tiers(tiers)
    settings = CacheSettings(
        tiers=tiers,
        writers=s.get_int("writers", DEFAULT_WRITERS, minimum=1),
        reservation_ttl_s=s.get_float(
            "reservation_ttl_s", DEFAULT_RESERVATION_TTL_S, minimum=0.0, strict_minimum=True
        ),
        sweep_interval_s=s.get_float(
            "sweep_interval_s", DEFAULT_SWEEP_INTERVAL_S, minimum=0.0, strict_minimum=True
        ),
        promote_on_hit=s.get_bool("promote_on_hit", True),
        demote_on_evict=s.get_bool("demote_on_evict", True),
        verify_on_scan=s.get_bool("verify_on_scan", False),
        restart=_restart(s.get("restart"), "cache.restart", RestartSettings()),
    )
    s.done()
    return settings


def parse_model(raw: object, path: str, policy: SavePolicy, cache: CacheSettings) -> ModelSettings:
    """Validate one model entry (``models[i]`` of sys.yaml, or `load_model` options).

    Raises:
        ConfigError: naming the key path.
    """
    s = _Section(raw, path)
    name = s.get_str("name", None)
    if name is None:
        raise ConfigError(s.key("name"), "is required")
    model = s.get_str("model", None)
    model_path = s.path_value("model_path", None)
    backend: Literal["llama", "stub"] = s.choice("backend", "llama", ("llama", "stub"))
    if backend == "llama" and (model is None) == (model_path is None):
        raise ConfigError(path, "needs exactly one of model (a known model name) or model_path")
    n_ctx = s.get_int("n_ctx", DEFAULT_N_CTX, minimum=16)
    n_batch = s.get_int("n_batch", DEFAULT_N_BATCH, minimum=1)
    n_seq_max = s.get_int("n_seq_max", DEFAULT_N_SEQ_MAX, minimum=1)
    if n_seq_max > 256:
        raise ConfigError(s.key("n_seq_max"), f"must be <= 256, got {n_seq_max}")
    if n_batch <= n_seq_max:
        raise ConfigError(
            s.key("n_batch"), f"must be > n_seq_max ({n_seq_max}) so prefill can progress"
        )
    tier = s.get_str("tier", "ram") or "ram"
    if cache.tier(tier) is None:
        known = ", ".join(t.name for t in cache.tiers)
        raise ConfigError(s.key("tier"), f"no such cache tier {tier!r} (configured: {known})")
    model_policy = _model_policy(s.get("policy"), s.key("policy"), policy)
    settings = ModelSettings(
        name=name,
        model=model,
        model_path=model_path,
        backend=backend,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_seq_max=n_seq_max,
        n_threads=s.optional_int("n_threads", minimum=1),
        tier=tier,
        deterministic=s.get_bool("deterministic", False),
        policy=model_policy,
        restart=_restart(
            s.get("restart"),
            s.key("restart"),
            RestartSettings(DEFAULT_MODEL_INTENSITY, DEFAULT_MODEL_PERIOD_S),
        ),
        fingerprint=_fingerprint(s),
        stub=_stub(s.get("stub"), s.key("stub")),
        max_queue=s.get_int("max_queue", DEFAULT_MAX_QUEUE, minimum=1),
        deadline_floor_s=s.get_float(
            "deadline_floor_s", DEFAULT_DEADLINE_FLOOR_S, minimum=0.0, strict_minimum=True
        ),
        deadline_factor=s.get_float("deadline_factor", DEFAULT_DEADLINE_FACTOR, minimum=1.0),
    )
    s.done()
    return settings


def _model_policy(raw: object, path: str, base: SavePolicy) -> SavePolicy:
    """The model's effective policy: the system policy with the model's overrides."""
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"must be a mapping, got {_describe(raw)}")
    for key in raw:
        if key not in vars(base):
            known = ", ".join(vars(base))
            raise ConfigError(f"{path}.{key}", f"unknown key (known keys: {known})")
    return validate_policy({**vars(base), **raw}, path)


def _fingerprint(s: _Section) -> bytes | None:
    value = s.get("fingerprint")
    if value is None:
        return None
    if isinstance(value, bytes) and len(value) == 32:
        return value
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) == 32:
            return raw
    raise ConfigError(s.key("fingerprint"), f"must be 32 bytes or 64 hex digits, got {value!r}")


_STUB_KEYS: dict[str, int | float] = {
    "n_vocab": 2,
    "eog_after": 1,
    "step_delay": 0.0,
    "n_swa": 0,
    "fail_on_step": 1,  # the stub raises on that step (fault tests)
}


def _stub(raw: object, path: str) -> dict[str, int | float]:
    s = _Section(raw, path)
    out: dict[str, int | float] = {}
    for key, minimum in _STUB_KEYS.items():
        if not s.has(key):
            s.get(key)
            continue
        if isinstance(minimum, int):
            out[key] = s.get_int(key, minimum, minimum=minimum)
        else:
            out[key] = s.get_float(key, minimum, minimum=minimum)
    s.done()
    return out


def _pressure(raw: object) -> PressureSettings:
    s = _Section(raw, "pressure")
    high = s.get_float("high_watermark", DEFAULT_HIGH_WATERMARK, minimum=0.0, maximum=1.0)
    low = s.get_float("low_watermark", DEFAULT_LOW_WATERMARK, minimum=0.0, maximum=1.0)
    if low >= high:
        raise ConfigError(
            "pressure.low_watermark", f"must be < high_watermark ({high:g}), got {low:g}"
        )
    tiers = s.get_list("evict_tiers") if s.has("evict_tiers") else ["ram", "ram_file"]
    for i, tier in enumerate(tiers):
        if tier not in TIER_KINDS:
            raise ConfigError(
                f"pressure.evict_tiers[{i}]",
                f"must be one of {', '.join(TIER_KINDS)}, got {_describe(tier)}",
            )
    s.get("evict_tiers")
    settings = PressureSettings(
        enabled=s.get_bool("enabled", False),
        source=s.choice("source", "system", ("system", "noop")),
        interval_ms=s.get_int("interval_ms", DEFAULT_PRESSURE_INTERVAL_MS, minimum=1),
        high_watermark=high,
        low_watermark=low,
        min_evict_bytes=s.get_int("min_evict_bytes", DEFAULT_MIN_EVICT_BYTES, minimum=0),
        evict_tiers=tuple(TierKind(str(t)) for t in tiers),
    )
    s.done()
    return settings


def _server(raw: object) -> ServerSettings:
    s = _Section(raw, "server")
    port = s.get_int("port", DEFAULT_PORT, minimum=0)
    if port > 65535:
        raise ConfigError("server.port", f"must be <= 65535, got {port}")
    keys = s.get_list("api_keys")
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise ConfigError(f"server.api_keys[{i}]", "must be a non-empty string")
    origins = s.get_list("cors_origins")
    for i, origin in enumerate(origins):
        if not isinstance(origin, str) or not origin:
            raise ConfigError(
                f"server.cors_origins[{i}]", f"must be a non-empty string, got {origin!r}"
            )
    settings = ServerSettings(
        host=s.get_str("host", DEFAULT_HOST) or DEFAULT_HOST,
        port=port,
        api_keys=tuple(str(k) for k in keys),
        request_timeout_s=s.get_float(
            "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S, minimum=0.0, strict_minimum=True
        ),
        max_body_bytes=s.get_int("max_body_mb", DEFAULT_MAX_BODY_MB, minimum=1) * MB,
        cors_origins=tuple(str(o) for o in origins),
        shutdown_timeout_s=s.get_float(
            "shutdown_timeout_s", DEFAULT_SHUTDOWN_TIMEOUT_S, minimum=0.0
        ),
    )
    s.done()
    return settings


def _daemon(raw: object) -> DaemonSettings:
    s = _Section(raw, "daemon")
    default = DaemonSettings()
    socket_path = s.path_value("control_socket", default.control_socket) or default.control_socket
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            s.key("control_socket"),
            f"a Unix socket path must be at most {MAX_SOCKET_PATH} bytes, got {socket_path}",
        )
    settings = DaemonSettings(
        pid_file=s.path_value("pid_file", default.pid_file) or default.pid_file,
        log_file=s.path_value("log_file", default.log_file) or default.log_file,
        log_max_bytes=s.get_int("log_max_mb", DEFAULT_LOG_MAX_MB, minimum=1) * MB,
        log_backups=s.get_int("log_backups", DEFAULT_LOG_BACKUPS, minimum=0),
        control_socket=socket_path,
    )
    s.done()
    return settings


def _ray(raw: object) -> RaySettings:
    s = _Section(raw, "ray")
    resources = s.get("resources_per_replica")
    if resources is None:
        resources = {}
    if not isinstance(resources, Mapping):
        raise ConfigError(s.key("resources_per_replica"), f"must be a mapping, got {resources!r}")
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(s.key("resources_per_replica"), f"bad resource name {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
            raise ConfigError(
                f"ray.resources_per_replica.{name}", f"must be a number > 0, got {amount!r}"
            )
    settings = RaySettings(
        address=s.get_str("address", None),
        replicas=s.get_int("replicas", DEFAULT_RAY_REPLICAS, minimum=1),
        num_cpus_per_replica=s.get_float("num_cpus_per_replica", 1.0, minimum=0.0),
        resources_per_replica={str(k): float(v) for k, v in resources.items()},
        max_ongoing_requests=s.get_int("max_ongoing_requests", DEFAULT_RAY_MAX_ONGOING, minimum=1),
        router=s.choice("router", "affinity", ("affinity", "default")),
        affinity_block_chars=s.get_int(
            "affinity_block_chars", DEFAULT_AFFINITY_BLOCK_CHARS, minimum=1
        ),
        affinity_max_blocks=s.get_int(
            "affinity_max_blocks", DEFAULT_AFFINITY_MAX_BLOCKS, minimum=1
        ),
        imbalance_threshold=s.get_int("imbalance_threshold", DEFAULT_IMBALANCE, minimum=0),
        app_name=s.get_str("app_name", "erllama-py") or "erllama-py",
    )
    s.done()
    return settings


# --------------------------------------------------------------------------- entry points


def parse_config(raw: Mapping[str, object] | None) -> Config:
    """Validate a raw mapping (as read from YAML) into a `Config`.

    Raises:
        ConfigError: naming the first invalid key and why.
    """
    s = _Section(raw, "")
    cache = _cache(s.get("cache"))
    policy = validate_policy(s.get("policy"), "policy")
    models_raw = s.get_list("models")
    models = tuple(
        parse_model(item, f"models[{i}]", policy, cache) for i, item in enumerate(models_raw)
    )
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        if model.name in seen:
            raise ConfigError(f"models[{i}].name", f"duplicates models[{seen[model.name]}].name")
        seen[model.name] = i
    config = Config(
        restart=_restart(s.get("restart"), "restart", RestartSettings()),
        cache=cache,
        policy=policy,
        models=models,
        pressure=_pressure(s.get("pressure")),
        server=_server(s.get("server")),
        daemon=_daemon(s.get("daemon")),
        ray=_ray(s.get("ray")),
    )
    s.done()
    return config


def load_config(
    source: str | os.PathLike[str] | Mapping[str, object] | Config | None,
) -> Config:
    """Load a configuration from a YAML path, a mapping, a `Config`, or defaults (None).

    Raises:
        ConfigError: the file is missing or not YAML, or a key is invalid.
    """
    if source is None:
        return parse_config({})
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return parse_config(source)
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(
            "<root>",
            "a config is a sys.yaml path, a mapping or a Config, "
            f"got {type(source).__name__} {source!r}",
        )
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML: {exc}") from exc
    return parse_config(raw)


def check_tier_roots(cache: CacheSettings) -> None:
    """Create every file tier's root, failing with the tier's key path if that is impossible."""
    for i, tier in enumerate(cache.tiers):
        if tier.root is None:
            continue
        try:
            tier.root.mkdir(parents=True, exist_ok=True)
            probe = tier.root / f".erllama-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cache.tiers[{i}].root",
                f"cannot create or write {tier.root}: {exc.strerror or exc}",
            ) from exc
