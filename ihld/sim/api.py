"""Ollama's wire format: reading chat/generate requests and shaping the replies.

Shapes follow ollama/ollama api/types.go: ``ChatResponse`` / ``GenerateResponse``
with ``Metrics`` (nanoseconds, ``omitempty``, so zero figures are left out),
``created_at`` as Go's RFC 3339 with nanoseconds in UTC, and ``/api/ps`` /
``/api/tags`` entries with ``details``. Validation errors carry the text
Ollama would send with its 400.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ihld.sim.durations import DurationError, parse_keep_alive
from ihld.sim.profiles import ModelSpec, Profile
from ihld.sim.runner import RunnerOptions

OLLAMA_VERSION = "0.12.3"

Endpoint = Literal["chat", "generate"]

# Options fixed when a runner starts; a different value forces a reload.
# Defaults as api.DefaultOptions() (num_ctx from the server's context length).
RUNNER_OPTION_DEFAULTS: dict[str, Any] = {
    "num_ctx": None,
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "use_mmap": None,
    "num_thread": 0,
    "draft_num_predict": None,
}
_INT_OPTIONS = {
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "draft_num_predict",
    "num_predict",
    "seed",
    "num_keep",
    "top_k",
    "repeat_last_n",
    "mirostat",
}
_BOOL_OPTIONS = {"use_mmap", "numa", "low_vram", "use_mlock", "penalize_newline"}


class BadRequest(ValueError):
    """A request Ollama would answer with 400; the message is the error text."""


@dataclass(frozen=True)
class CompletionCall:
    """A parsed /api/chat or /api/generate request."""

    endpoint: Endpoint
    model: str
    messages: tuple[Mapping[str, Any], ...] = ()
    prompt: str = ""
    system: str = ""
    stream: bool = True
    format: str | Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None
    think: Any = None

    @property
    def has_content(self) -> bool:
        return bool(self.messages) if self.endpoint == "chat" else self.prompt != ""

    @property
    def kind(self) -> str:
        """The request's kind: chat (real work), unload (no content, keep_alive 0), load."""
        if self.has_content:
            return "chat"
        return "unload" if self.keep_alive == 0 else "load"

    def content(self) -> Any:
        """What the model reads: messages (chat) or system + prompt (generate)."""
        if self.endpoint == "chat":
            return [dict(m) for m in self.messages]
        return [self.system, self.prompt]

    def prompt_text(self) -> str:
        """The prompt as the slot cache sees it: each message's role and content, in order."""
        if self.endpoint == "chat":
            return "".join(f"<{m.get('role')}>{m.get('content') or ''}" for m in self.messages)
        return f"<system>{self.system}<user>{self.prompt}"

    def prompt_chars(self) -> int:
        if self.endpoint == "chat":
            return sum(len(str(m.get("content") or "")) for m in self.messages)
        return len(self.system) + len(self.prompt)

    def num_predict(self) -> int | None:
        value = self.options.get("num_predict")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)

    def runner_options(
        self, profile: Profile, spec: ModelSpec | None = None
    ) -> tuple[RunnerOptions, int]:
        """The load-time options (defaults filled in) and the context length.

        As ``needsReload`` compares them (server/sched.go): a negative ``num_gpu`` is
        ignored (auto), and ``num_ctx`` is clamped to the model's training context,
        so two values above it are the same runner.
        """
        merged = dict(RUNNER_OPTION_DEFAULTS)
        merged["num_ctx"] = profile.default_num_ctx
        for key in RUNNER_OPTION_DEFAULTS:
            if self.options.get(key) is not None:
                merged[key] = self.options[key]
        gpu = merged.get("num_gpu")
        if isinstance(gpu, int | float) and not isinstance(gpu, bool) and gpu < 0:
            merged["num_gpu"] = RUNNER_OPTION_DEFAULTS.get("num_gpu")
        num_ctx = max(4, int(merged["num_ctx"]))  # sched.go: NumCtx < 4 becomes 4
        if spec is not None and spec.context_length > 0:
            num_ctx = min(num_ctx, spec.context_length)
        merged["num_ctx"] = num_ctx
        return tuple(sorted(merged.items())), num_ctx


def _check_options(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise BadRequest(
            "json: cannot unmarshal "
            f"{_json_type(raw)} into Go struct field .options of type map[string]interface {{}}"
        )
    for key, value in raw.items():
        if value is None:
            continue
        if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f'option "{key}" must be of type integer')
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            raise BadRequest(f'option "{key}" must be of type boolean')
    return dict(raw)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return "null"


ERR_FORMAT_TAIL = 'expected "json" or a valid JSON Schema object'


def valid_format(fmt: Any) -> bool:
    return fmt is None or fmt == "json" or isinstance(fmt, Mapping)


def _check_format(raw: Any) -> Any:
    """Any JSON value: the runner judges it after the load (``valid_format``)."""
    return None if raw is None or raw == "" else raw


def _check_messages(raw: Any) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest(
            f"json: cannot unmarshal {_json_type(raw)} into Go struct field "
            "ChatRequest.messages of type []api.Message"
        )
    out: list[Mapping[str, Any]] = []
    for message in raw:
        if not isinstance(message, Mapping):
            raise BadRequest(
                f"json: cannot unmarshal {_json_type(message)} into Go struct field "
                "ChatRequest.messages of type api.Message"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise BadRequest(
                f"json: cannot unmarshal {_json_type(content)} into Go struct field "
                "Message.messages.content of type string"
            )
        out.append(message)
    return tuple(out)


def _check_str(body: Mapping[str, Any], key: str, struct: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field "
            f"{struct}.{key} of type string"
        )
    return value


def parse_call(body: Any, endpoint: Endpoint) -> CompletionCall:
    """Validate a request body the way Ollama's handlers do, in the same order."""
    struct = "ChatRequest" if endpoint == "chat" else "GenerateRequest"
    if not isinstance(body, Mapping):
        raise BadRequest(
            f"json: cannot unmarshal {_json_type(body)} into Go value of type api.{struct}"
        )
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except DurationError as exc:
        raise BadRequest(str(exc)) from None
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(
            f"json: cannot unmarshal {_json_type(stream)} into Go struct field "
            f"{struct}.stream of type bool"
        )
    model = _check_str(body, "model", struct)
    call = CompletionCall(
        endpoint=endpoint,
        model=model,
        messages=_check_messages(body.get("messages")) if endpoint == "chat" else (),
        prompt=_check_str(body, "prompt", struct) if endpoint == "generate" else "",
        system=_check_str(body, "system", struct) if endpoint == "generate" else "",
        stream=stream is not False,
        format=_check_format(body.get("format")),
        options=_check_options(body.get("options")),
        keep_alive=keep_alive,
        think=body.get("think"),
    )
    if not model:
        raise BadRequest("model is required")
    return call


# --- replies -----------------------------------------------------------------


def go_time(epoch: float | None = None) -> str:
    """Go's time.Time JSON form (RFC 3339, nanoseconds, trailing zeros cut), in UTC."""
    ns = time.time_ns() if epoch is None else int(epoch * 1e9)
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def far_future_time(epoch: float) -> str:
    """expires_at for keep-forever models, clamped to what datetime can show."""
    return go_time(min(epoch, 253402300799.0))


def details(spec: ModelSpec) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization_level,
    }


def message_chunk(call: CompletionCall, text: str) -> dict[str, Any]:
    """One streamed piece of the answer (done: false)."""
    if call.endpoint == "chat":
        return {
            "model": call.model,
            "created_at": go_time(),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }
    return {"model": call.model, "created_at": go_time(), "response": text, "done": False}


def final_object(
    call: CompletionCall,
    text: str,
    done_reason: str,
    metrics: Mapping[str, int],
    context: list[int] | None = None,
) -> dict[str, Any]:
    """The last object: ``done: true``, why it stopped, and the metrics (omitempty)."""
    if call.endpoint == "chat":
        out: dict[str, Any] = {
            "model": call.model,
            "created_at": go_time(),
            "message": {"role": "assistant", "content": text},
            "done_reason": done_reason,
            "done": True,
        }
    else:
        out = {
            "model": call.model,
            "created_at": go_time(),
            "response": text,
            "done": True,
            "done_reason": done_reason,
        }
        if context:
            out["context"] = context
    for key, value in metrics.items():
        if value:
            out[key] = value
    return out


def lifecycle_object(call: CompletionCall, done_reason: str) -> dict[str, Any]:
    """The reply to a deliberate load or unload (no metrics, as Ollama)."""
    if call.endpoint == "chat":
        return {
            "model": call.model,
            "created_at": go_time(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": done_reason,
            "done": True,
        }
    return {
        "model": call.model,
        "created_at": go_time(),
        "response": "",
        "done": True,
        "done_reason": done_reason,
    }


def ps_entry(spec: ModelSpec, size_vram: int, expires_at: float, num_ctx: int) -> dict[str, Any]:
    return {
        "name": spec.name,
        "model": spec.name,
        "size": spec.size_bytes,
        "digest": spec.digest,
        "details": details(spec),
        "expires_at": far_future_time(expires_at),
        "size_vram": size_vram,
        "context_length": num_ctx,
    }


def tags_entry(spec: ModelSpec, modified_at: float) -> dict[str, Any]:
    return {
        "name": spec.name,
        "model": spec.name,
        "modified_at": go_time(modified_at),
        "size": spec.size_bytes,
        "digest": spec.digest,
        "details": details(spec),
    }


def show_object(spec: ModelSpec, modified_at: float) -> dict[str, Any]:
    """A minimal /api/show: details, model_info and capabilities."""
    scale = 1e9 if spec.parameter_size.endswith("B") else 1e6
    params = int(float(spec.parameter_size.rstrip("BM")) * scale)
    return {
        "license": "",
        "modelfile": f"# Modelfile generated by the ihld simulator\nFROM {spec.name}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": details(spec),
        "model_info": {
            "general.architecture": spec.family,
            "general.parameter_count": params,
            f"{spec.family}.context_length": spec.context_length,
        },
        "capabilities": ["completion", "thinking"] if spec.thinking else ["completion"],
        "modified_at": go_time(modified_at),
    }


def context_tokens(key: bytes, count: int) -> list[int]:
    """/api/generate's deprecated ``context``: deterministic token ids, one per token."""
    return [(key[i % len(key)] * 131 + i * 7919) % 151_936 for i in range(max(0, count))]
