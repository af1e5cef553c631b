"""The default plugin: the ``prompt`` actor, and helpers for writing actors.

It is an ordinary plugin (datasette's ``DEFAULT_PLUGINS`` pattern), registered
first and with ``trylast=True``, so a user plugin that registers an actor
named ``prompt`` replaces it.

The ``prompt`` actor renders ``stage.prompt`` as a template over the job's
input and earlier stages' outputs. Templates come from job files, which anyone
with write access to the inbox can drop, so rendering is deliberately *not*
``str.format_map`` on live objects: ``format`` would follow ``{input.__class__}``
into Python internals and ``{input:>999999999}`` would allocate gigabytes.
Fields are parsed with ``string.Formatter.parse``, only ``[key]`` lookups in
plain JSON data are followed, format specs are bounded and the rendered text
has a size limit.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ihld.backends.base import ChatRequest
from ihld.common.errors import StageError
from ihld.core.actors import Actor, StageContext, parse_json_reply
from ihld.core.jobs import JsonFormat, StageSpec
from ihld.core.policies import BUILTIN as BUILTIN_POLICIES
from ihld.core.scheduler import PolicyFactory
from ihld.core.schema import json_type, validate_schema
from ihld.plugins.hookspecs import hookimpl

__all__ = [
    "MAX_RENDERED_CHARS",
    "PromptActor",
    "TemplateError",
    "chat_request",
    "check_stage",
    "check_template",
    "parse_json_reply",
    "render_template",
    "validate_schema",
]

ROOTS = ("input", "stages", "job_id")
# A prompt longer than this fits no model's context; stop before building it.
MAX_RENDERED_CHARS = 2_000_000
# fill/align, sign, '#', '0', width <= 999, grouping, precision <= 99, type.
_SPEC_RE = re.compile(r"^(?:.?[<>=^])?[+\- ]?#?0?\d{0,3}[,_]?(?:\.\d{1,2})?[bcdeEfFgGnosxX%]?$")
_CONVERSIONS: dict[str, Callable[[object], str]] = {"s": str, "r": repr, "a": ascii}


class TemplateError(ValueError):
    """A prompt template is malformed, unsafe, or refers to data that is not there."""


@dataclass(frozen=True)
class _Field:
    """One ``{...}`` replacement field, parsed and checked."""

    text: str  # as written, for error messages
    root: str  # input | stages | job_id
    keys: tuple[str, ...]
    conversion: str | None
    spec: str


def _parse_field(name: str, spec: str, conversion: str | None) -> _Field:
    text = (
        "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    )
    root_end = len(name)
    for index, char in enumerate(name):
        if char in ".[":
            root_end = index
            break
    root, rest = name[:root_end], name[root_end:]
    if root == "" or root.isdigit():
        raise TemplateError(f"{text}: positional fields are not allowed; write {{input[key]}}")
    if root not in ROOTS:
        raise TemplateError(f"{text}: unknown name {root!r} (use input, stages or job_id)")
    keys: list[str] = []
    while rest:
        if rest.startswith("."):
            attribute = re.split(r"[.\[]", rest[1:], maxsplit=1)[0]
            raise TemplateError(
                f"{text}: attribute access ('.{attribute}') is not allowed; use [key]"
            )
        if not rest.startswith("["):
            raise TemplateError(f"{text}: only [key] may follow a name or a ']'")
        close = rest.find("]")
        if close == -1:
            raise TemplateError(f"{text}: '[' without a matching ']'")
        key = rest[1:close]
        if not key:
            raise TemplateError(f"{text}: empty [] index")
        keys.append(key)
        rest = rest[close + 1 :]
    if root == "job_id" and keys:
        raise TemplateError(f"{text}: job_id is a string and takes no [key]")
    if conversion is not None and conversion not in _CONVERSIONS:
        raise TemplateError(f"{text}: unknown conversion !{conversion} (use !s, !r or !a)")
    if "{" in spec or "}" in spec:
        raise TemplateError(f"{text}: nested fields in a format spec are not allowed")
    if spec and not _SPEC_RE.match(spec):
        raise TemplateError(
            f"{text}: format spec {spec!r} is not allowed (width up to 999, precision up to 99)"
        )
    return _Field(text, root, tuple(keys), conversion, spec)


def _parse(template: str) -> list[str | _Field]:
    """Split a template into literal text and checked fields; raise TemplateError."""
    parts: list[str | _Field] = []
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"malformed template: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    for literal, name, spec, conversion in pieces:
        if literal:
            parts.append(literal)
        if name is not None:
            parts.append(_parse_field(name, spec or "", conversion))
    return parts


def check_template(template: str, *, stages: Collection[str] | None = None) -> None:
    """Raise ``ValueError`` (a ``TemplateError``) if ``template`` cannot be rendered safely.

    Used at job validation, so a bad template is rejected into ``failed/``
    before any model is loaded. With ``stages``, a ``{stages[name]}`` field
    must name one of them (the stages that are certain to have finished).
    Missing *input* keys can only be found when rendering.
    """
    for part in _parse(template):
        if not isinstance(part, _Field) or part.root != "stages" or not part.keys:
            continue
        if stages is not None and part.keys[0] not in stages:
            known = ", ".join(sorted(stages)) or "none"
            raise TemplateError(
                f"{part.text}: no earlier stage named {part.keys[0]!r} (available: {known})"
            )


def _lookup(field: _Field, values: Mapping[str, Any]) -> Any:
    value = values[field.root]
    where = field.root
    for key in field.keys:
        if isinstance(value, Mapping):
            if key not in value:
                available = ", ".join(sorted(map(str, value))[:20]) or "none"
                what = "no output from stage" if where == "stages" else f"{where} has no key"
                raise TemplateError(f"{field.text}: {what} {key!r} (available: {available})")
            value = value[key]
        elif isinstance(value, list | tuple):
            if not key.isdigit() or int(key) >= len(value):
                raise TemplateError(
                    f"{field.text}: {where} is a list of {len(value)}; no index {key!r}"
                )
            value = value[int(key)]
        else:
            raise TemplateError(
                f"{field.text}: {where} is {json_type(value)}, not an object or list, "
                f"so [{key}] does not apply"
            )
        where = f"{where}[{key}]"
    return value


def _as_text(value: Any) -> Any:
    """Strings stay text, numbers stay numbers (for format specs), the rest becomes JSON."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def render(template: str, values: Mapping[str, Any]) -> str:
    """Render ``template`` over ``values`` (keys ``input``, ``stages``, ``job_id``)."""
    out: list[str] = []
    size = 0
    for part in _parse(template):
        if isinstance(part, str):
            piece = part
        else:
            value = _as_text(_lookup(part, values))
            if part.conversion:
                value = _CONVERSIONS[part.conversion](value)
            try:
                piece = format(value, part.spec)
            except (ValueError, TypeError) as exc:
                raise TemplateError(f"{part.text}: {exc}") from None
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise TemplateError(f"rendered prompt exceeds {MAX_RENDERED_CHARS} characters")
        out.append(piece)
    return "".join(out)


def render_template(template: str, ctx: StageContext) -> str:
    """Render a template for a stage; a bad template or missing key fails it for good.

    Not retryable: the same input renders the same way on every attempt.
    """
    values = {"input": ctx.input, "stages": ctx.outputs, "job_id": ctx.job_id}
    try:
        return render(template, values)
    except TemplateError as exc:
        raise StageError(
            f"stage {ctx.stage.name!r}: prompt template: {exc}",
            retryable=False,
            kind="template_error",
        ) from None


def chat_request(
    ctx: StageContext,
    messages: list[dict[str, Any]],
    *,
    format: JsonFormat | None = None,
    options: Mapping[str, Any] | None = None,
    think: bool | str | None = None,
) -> ChatRequest:
    """A ChatRequest for this stage. The stage wins: its model, and its ``options``,
    ``format`` and ``think`` where it sets them; the arguments are the actor's
    defaults for what it does not set (the same rule the daemon applies last).
    """
    if not ctx.stage.model:
        raise StageError(f"stage {ctx.stage.name!r} has no model", retryable=False, kind="no_model")
    return ChatRequest(
        model=ctx.stage.model,
        messages=messages,
        options={**(options or {}), **ctx.stage.options},
        format=ctx.stage.format if ctx.stage.format is not None else format,
        think=ctx.stage.think if ctx.stage.think is not None else think,
    )


def check_stage(stage: StageSpec, *, earlier: Collection[str] | None = None) -> None:
    """Raise ``ValueError`` if ``stage`` cannot run on the prompt actor (no or bad template)."""
    if stage.prompt is None:
        raise TemplateError(f"stage {stage.name!r}: the prompt actor needs a 'prompt' template")
    try:
        check_template(stage.prompt, stages=earlier)
    except TemplateError as exc:
        raise TemplateError(f"stage {stage.name!r}: prompt: {exc}") from None


class PromptActor(Actor):
    """Send ``stage.system`` and the rendered ``stage.prompt``; return text or parsed JSON.

    The system message is sent as written (not a template), so it may contain
    braces, e.g. a JSON example.
    """

    name = "prompt"

    def build_request(self, ctx: StageContext) -> ChatRequest:
        if ctx.stage.prompt is None:
            raise StageError(
                f"stage {ctx.stage.name!r}: the prompt actor needs a 'prompt' template",
                retryable=False,
                kind="template_error",
            )
        messages: list[dict[str, Any]] = []
        if ctx.stage.system:
            messages.append({"role": "system", "content": ctx.stage.system})
        messages.append({"role": "user", "content": render_template(ctx.stage.prompt, ctx)})
        return chat_request(ctx, messages)


PROMPT_ACTOR = PromptActor()


@hookimpl(trylast=True)
def register_actors(register: Callable[[Actor], None]) -> None:
    """The fallback ``prompt`` actor; trylast so user plugins are asked first."""
    register(PROMPT_ACTOR)


@hookimpl(trylast=True)
def register_policies(register: Callable[[str, PolicyFactory], None]) -> None:
    """``affinity`` (the default) and ``fifo`` (the baseline); a plugin may replace them."""
    for name, factory in BUILTIN_POLICIES.items():
        register(name, factory)
