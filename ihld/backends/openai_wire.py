"""The OpenAI-compatible wire format: request bodies, token counts, error objects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ihld.backends.base import (
    ChatRequest,
)

# The name a JSON-schema ``format`` gets in ``response_format.json_schema``.
SCHEMA_NAME = "stage"

# Ollama option -> request field(s). Standard OpenAI parameters first; the rest
# are documented extensions: top_k (vLLM, llama-server, LM Studio), min_p (vLLM,
# llama-server), repeat_penalty (llama-server, LM Studio; vLLM names it
# repetition_penalty and ignores unknown fields, so both are sent), and
# llama-server's own samplers. Servers that do not know an extension ignore it.
OPTION_MAP: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "seed": ("seed",),
    "num_predict": ("max_tokens",),
    "stop": ("stop",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
    "top_k": ("top_k",),
    "min_p": ("min_p",),
    "repeat_penalty": ("repeat_penalty", "repetition_penalty"),
    "typical_p": ("typical_p",),
    "repeat_last_n": ("repeat_last_n",),
    "mirostat": ("mirostat",),
    "mirostat_tau": ("mirostat_tau",),
    "mirostat_eta": ("mirostat_eta",),
    "num_keep": ("n_keep",),
}

# Ollama options fixed when its runner starts; an OpenAI server fixes them on its
# command line (--max-model-len, -c, -ngl ...), so they are dropped without a warning.
SERVER_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "draft_num_predict",
    }
)


def _as_int(value: Any) -> int | None:
    """An integral JSON number as int; anything else (bool, str, 1.5, None) as None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _ms_to_ns(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return round(value * 1_000_000)


def _flatten_ints(prefix: str, obj: Mapping[str, Any], out: dict[str, int]) -> None:
    """``usage`` as flat integer metrics: ``usage_prompt_tokens``, ``usage_x_details_y``."""
    for key, value in obj.items():
        name = f"{prefix}_{key}"
        if isinstance(value, Mapping):
            _flatten_ints(name, value, out)
        elif (number := _as_int(value)) is not None:
            out[name] = number


def openai_metrics(usage: Any, timings: Any) -> dict[str, int]:
    """ChatResult.metrics from an OpenAI ``usage`` and a llama-server ``timings`` object.

    Under Ollama's names where they map: ``prompt_eval_count`` =
    ``usage.prompt_tokens``, ``eval_count`` = ``usage.completion_tokens``,
    ``prompt_eval_duration`` / ``eval_duration`` = ``timings.prompt_ms`` /
    ``predicted_ms`` in nanoseconds. Without ``usage`` the counts come from
    ``timings`` (``prompt_n + cache_n``, ``predicted_n``). The raw integers are
    kept too, as ``usage_*`` and ``timings_*_n``. A figure the server did not send
    is left out (not 0): vLLM and LM Studio send no durations.
    """
    out: dict[str, int] = {}
    if isinstance(usage, Mapping):
        if (prompt := _as_int(usage.get("prompt_tokens"))) is not None:
            out["prompt_eval_count"] = prompt
        if (completion := _as_int(usage.get("completion_tokens"))) is not None:
            out["eval_count"] = completion
        _flatten_ints("usage", usage, out)
    if isinstance(timings, Mapping):
        if (ns := _ms_to_ns(timings.get("prompt_ms"))) is not None:
            out["prompt_eval_duration"] = ns
        if (ns := _ms_to_ns(timings.get("predicted_ms"))) is not None:
            out["eval_duration"] = ns
        prompt_n = _as_int(timings.get("prompt_n"))
        if prompt_n is not None:  # evaluated; cache_n were reused from the slot's cache
            out["prompt_evaluated"] = prompt_n
        if "prompt_eval_count" not in out and prompt_n is not None:
            out["prompt_eval_count"] = prompt_n + (_as_int(timings.get("cache_n")) or 0)
        predicted_n = _as_int(timings.get("predicted_n"))
        if "eval_count" not in out and predicted_n is not None:
            out["eval_count"] = predicted_n
        for key, value in timings.items():  # the counts (cache_n, prompt_n, ...), not the ms
            if key.endswith("_n") and (number := _as_int(value)) is not None:
                out[f"timings_{key}"] = number
    return out


def response_format(fmt: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stage's ``format`` as ``response_format``: "json" -> json_object, schema -> json_schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, Mapping):
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": dict(fmt), "strict": True},
        }
    raise ValueError(f'format must be "json" or a JSON schema object, got {fmt!r}')


def request_body(
    request: ChatRequest, *, stream: bool, dropped: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The /v1/chat/completions body for ``request``; ``dropped(name)`` hears of unmapped options.

    ``num_predict`` <= 0 (Ollama: no limit) sends no ``max_tokens``. ``think``
    becomes ``chat_template_kwargs.enable_thinking`` (vLLM and llama-server;
    it only matters to chat templates that read it, e.g. Qwen3). Raises
    ValueError for a ``format`` that is neither "json" nor a schema.
    """
    body: dict[str, Any] = {"model": request.model, "messages": request.messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    for name, value in request.options.items():
        if value is None:
            continue
        fields = OPTION_MAP.get(name)
        if fields is None:
            if dropped is not None and name not in SERVER_OPTIONS:
                dropped(name)
            continue
        if name == "num_predict" and (_as_int(value) or 0) <= 0:
            continue
        for wire in fields:
            body[wire] = value
    fmt = response_format(request.format)
    if fmt is not None:
        body["response_format"] = fmt
    if request.think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": request.think}
    return body


@dataclass
class _Error:
    """The useful parts of an OpenAI-style error object, whatever its dialect."""

    message: str
    type: str = ""
    code: Any = None

    @classmethod
    def parse(cls, obj: Any, fallback: str, *, bare: bool = False) -> _Error | None:
        """From ``{"error": {...}}``, ``{"error": "text"}`` or ``{"object": "error", ...}``.

        ``bare``: ``obj`` is known to be an error, possibly the error object
        itself (llama-server's ``error: {"code", "message", "type"}`` line).
        """
        if not isinstance(obj, Mapping):
            return None
        err = obj.get("error")
        if isinstance(err, str):
            return cls(err)
        if not isinstance(err, Mapping):
            if obj.get("object") != "error" and not bare:
                return None
            err = obj
        message = err.get("message")
        kind = err.get("type")
        return cls(
            message if isinstance(message, str) and message else fallback,
            kind if isinstance(kind, str) else "",
            err.get("code"),
        )

    @property
    def model_missing(self) -> bool:
        """The error says the model does not exist (OpenAI, vLLM, llama-swap wordings)."""
        return (
            self.code == "model_not_found"
            or self.type in ("NotFoundError", "not_found_error", "model_not_found")
            or "could not find real modelID" in self.message
        )

    def describe(self) -> str:
        extra = ", ".join(
            part for part in (self.type, "" if self.code is None else f"code {self.code}") if part
        )
        return f"{self.message} ({extra})" if extra else self.message
