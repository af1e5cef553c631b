"""A backend's settings (``[[backends]]`` in ihld.toml): the backends' own config model.

It lives with the backends so that they need nothing from the layers above;
``ihld.core.config`` embeds it in the daemon's whole configuration.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    url: str = "http://127.0.0.1:11434"
    # openai: /v1/chat/completions servers; llamacpp: llama.cpp's server, its router driven
    kind: Literal["ollama", "openai", "llamacpp"] = "ollama"
    slots: int = Field(default=1, ge=1, le=256)  # OLLAMA_NUM_PARALLEL
    max_loaded: int = Field(default=1, ge=1, le=64)  # OLLAMA_MAX_LOADED_MODELS (that fit)
    keep_alive: float | int | str = "30m"  # sent while a model has work
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)  # max silence between stream chunks
    retries: int = Field(default=3, ge=0)  # quick transport retries before "backend down"
    # kinds "openai"/"llamacpp": stream answers (SSE); false asks for whole replies, which
    # costs a CPU-bound server (and ihld) less per token
    stream: bool = True
    models: list[str] | None = None  # allow-list; None = any model
    # kind "openai": the NAME of an environment variable holding a bearer token (never the token).
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

    @model_validator(mode="after")
    def _api_key_needs_openai(self) -> BackendConfig:
        if self.api_key_env is not None and self.kind == "ollama":
            raise ValueError('api_key_env is only used with kind = "openai" or "llamacpp"')
        return self
