"""The daemon's configuration: ``etc/ihld.toml``, validated with pydantic.

Every key is documented in the shipped file. An error names the file and the
key path, so ``systemctl reload`` with a typo says exactly what to fix while
the old config stays in force.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ihld.backends.settings import BackendConfig
from ihld.common.errors import ConfigError
from ihld.core.jobs import StageOverride, StageSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "etc" / "ihld.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpoolConfig(_Strict):
    dir: Path = Path("/var/lib/ihld")
    settle_s: float = Field(default=0.5, ge=0)  # a file must be unchanged this long to be claimed
    rescan_s: float = Field(default=2.0, gt=0)  # periodic inbox scan (events can be lost)
    max_recoveries: int = Field(default=3, ge=1)  # recovered this often -> failed/ as poison
    node: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")  # shared spools


class SchedulerConfig(_Strict):
    # a registered policy: "affinity", "fifo", or one a plugin adds (register_policies)
    policy: str = Field(default="affinity", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_wait_s: float = Field(default=600.0, gt=0)  # bound for higher-priority work
    fair_wait_s: float | None = Field(default=None, gt=0)  # bound for all work (off)
    fifo_workers: int = Field(default=1, ge=1)  # concurrent jobs under fifo (the seed had 1)
    prefetch: int = Field(default=1, ge=0, le=64)  # requests queued at the server beyond slots
    reconcile_s: float = Field(default=5.0, gt=0)  # read the servers' resident models
    # order a model's queue so each slot keeps its prompt prefix (llama.cpp/Ollama slot cache)
    prompt_cache: bool = True
    # the last requests of a wave (before a switch): longest expected stage first
    longest_first: bool = True
    # a model that runs dry while work for it is on its way keeps its slots up to one load time
    hold_dry: bool = True


class PluginsConfig(_Strict):
    dirs: list[Path] = Field(default_factory=lambda: [REPO_ROOT / "plugins"])
    entry_points: bool = True  # load installed distributions with an `ihld` entry point


class LimitsConfig(_Strict):
    max_job_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    stage_timeout_s: float = Field(default=900.0, gt=0)  # whole-stage deadline
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    job_deadline_s: float | None = Field(default=None, gt=0)  # None: outages only delay
    max_jobs_in_memory: int = Field(default=10_000, ge=1)  # the rest waits in the store


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: bool = True  # also write <spool>/log/ihld.jsonl
    stderr: bool = True


class ControlConfig(_Strict):
    socket: bool = True  # <spool>/run/ihld.sock
    grace_s: float = Field(default=60.0, ge=0)  # SIGTERM: wait this long for in-flight stages
    # Also serve GET /status and /metrics (read-only) on this TCP "host:port"; None: no listener.
    listen: str | None = Field(
        default=None,
        pattern=r"^(localhost|\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):\d{1,5}$",
    )


class PipelineConfig(_Strict):
    """A pipeline declared in config, or overrides for a plugin's pipeline."""

    stages: list[StageSpec] | None = None
    overrides: dict[str, StageOverride] = Field(default_factory=dict)


class Config(_Strict):
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    backends: list[BackendConfig] = Field(
        default_factory=lambda: [BackendConfig(name="local")], min_length=1
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_backends(self) -> Config:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        return self


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in the file are relative to the file's directory."""
    if not config.spool.dir.is_absolute():
        config.spool.dir = (base / config.spool.dir).resolve()
    config.plugins.dirs = [
        d if d.is_absolute() else (base / d).resolve() for d in config.plugins.dirs
    ]
    return config


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config`` wins, then ``$IHLD_CONFIG``, then the shipped ``etc/ihld.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("IHLD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def parse_config(data: dict[str, Any], source: Path) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{source}: key {key}: {msg}")
        raise ConfigError("\n".join(problems)) from None
    config.source = source
    return _resolve_paths(config, source.parent)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file, or raise ConfigError naming file and key."""
    source = config_path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(data, source)


def live_update(current: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` as far as it can take effect without a restart, and the keys that cannot.

    Backends, the policy and the spool keep their current values until a restart.
    """
    restart = []
    if new.spool.dir != current.spool.dir:
        restart.append("spool.dir")
    if new.backends != current.backends:
        restart.append("backends")
    if new.scheduler.policy != current.scheduler.policy:
        restart.append("scheduler.policy")
    scheduler = new.scheduler.model_copy(update={"policy": current.scheduler.policy})
    kept = new.model_copy(
        update={"backends": current.backends, "spool": current.spool, "scheduler": scheduler}
    )
    return kept, restart
