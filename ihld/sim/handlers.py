"""HTTP handlers: Ollama's endpoints plus the simulator's own /sim/* controls.

The chat/generate handler does what Ollama's ChatHandler does, in its order:
validate (400), find the model (404), unload or load on request, get a
runner from the scheduler (503 when the load queue is full), then hold a
slot, evaluate the prompt and stream the tokens at the cost model's pace.
Injected faults cut in at the point where the real failure would happen.

The OpenAI endpoints (openai_api.py) reuse the request reading (``read_call``),
the serving (``_serve``) and the reply's stream handling (``_Reply``), so both
APIs share one engine, one cost model and one way of failing.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from ihld.sim.api import (
    ERR_FORMAT_TAIL,
    OLLAMA_VERSION,
    BadRequest,
    CompletionCall,
    Endpoint,
    context_tokens,
    final_object,
    lifecycle_object,
    parse_call,
    ps_entry,
    show_object,
    tags_entry,
    valid_format,
)
from ihld.sim.engine import ERR_MAX_QUEUE, Engine, QueueFull
from ihld.sim.faults import FaultChoice, FaultPicker, Faults
from ihld.sim.output import plan_output, prompt_tokens, request_key
from ihld.sim.profiles import Profile
from ihld.sim.reply import (
    _drop,
    _Reply,
    _send_whole,
    error_response,
    json_response,
)
from ihld.sim.runner import Runner
from ihld.sim.stats import RequestRecord, SimStats

TASK_HEADER = "X-Ihld-Task"
ERR_500 = "llama runner process has terminated: exit status 2"
ERR_MIDSTREAM = "an error was encountered while running the model: unexpected EOF"


@dataclass
class SimState:
    """Everything the handlers share, stored on the aiohttp application."""

    profile: Profile
    engine: Engine
    stats: SimStats
    faults: FaultPicker
    speed: float
    modified_at: float


STATE: web.AppKey[SimState] = web.AppKey("ihld_sim_state", SimState)
# Builds the reply object of one call: _Reply (Ollama's NDJSON) or a subclass.
ReplyFactory = Callable[[web.Request, CompletionCall, RequestRecord], "_Reply"]
# Answers a refused call in one API's error format, noting the status on its record.
Fail = Callable[[RequestRecord, int, str], web.Response]

T = TypeVar("T")


# --- Ollama endpoints --------------------------------------------------------------


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_VERSION})


async def tags(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(
        {"models": [tags_entry(spec, state.modified_at) for spec in state.profile.models]}
    )


async def ps(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # Ollama lists the model that expires last first.
    resident = sorted(state.engine.ps(), key=lambda item: -item[1])
    models = [ps_entry(r.spec, r.size_vram, expiry, r.num_ctx) for r, expiry in resident]
    return json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "missing request body")
    if not isinstance(body, dict):
        return error_response(400, "model is required")
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        return error_response(400, "model is required")
    spec = state.profile.spec(name)
    if spec is None:
        return error_response(404, f"model '{name}' not found")
    return json_response(show_object(spec, state.modified_at))


async def chat(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "generate")


# --- /sim controls -----------------------------------------------------------------


async def sim_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap = state.stats.snapshot()
    snap["profile"] = state.profile.name
    snap["scheduler"] = state.engine.describe()
    return json_response(snap)


async def sim_requests(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].stats.requests_json())


async def sim_reset(request: web.Request) -> web.Response:
    request.app[STATE].stats.reset()
    return json_response({"ok": True})


async def sim_faults_get(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].faults.faults.to_json())


async def sim_faults_set(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        faults = Faults.from_json(body, state.faults.faults)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, str(exc))
    state.faults.faults = faults
    if seed is not None:
        state.faults.reseed(seed)
    return json_response(faults.to_json())


# --- chat / generate ---------------------------------------------------------------


def _guess_kind(body: Any, endpoint: Endpoint) -> str:
    if not isinstance(body, dict):
        return "chat"
    content = body.get("messages") if endpoint == "chat" else body.get("prompt")
    if content:
        return "chat"
    return "unload" if body.get("keep_alive") == 0 else "load"


def _fail(rec: RequestRecord, status: int, message: str) -> web.Response:
    rec.status = status
    return error_response(status, message)


async def read_call(
    request: web.Request,
    parse: Callable[[Any], T],
    *,
    empty: str,
    invalid: str,
    kind: Callable[[Any], str],
    fail: Fail,
) -> T | web.Response:
    """Read a completion request's JSON body and ``parse`` it, or answer 400 through ``fail``.

    Shared by the Ollama and OpenAI endpoints; ``empty`` and ``invalid`` are
    each API's words for an empty body and for one that is not JSON (the
    parser's own words follow ``invalid``). A refused request is still logged,
    under the model its body names, as ``kind(body)``.
    """
    body: Any = None
    try:
        raw = await request.read()
        if not raw.strip():
            raise BadRequest(empty)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"{invalid}: {exc}") from None
        return parse(body)
    except BadRequest as exc:
        model = body.get("model") if isinstance(body, dict) else None
        rec = request.app[STATE].stats.record_request(
            model if isinstance(model, str) and model else None,
            request.headers.get(TASK_HEADER),
            kind(body),
        )
        return fail(rec, 400, str(exc))


async def _completion(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    started = time.monotonic()
    call = await read_call(
        request,
        lambda body: parse_call(body, endpoint),
        empty="missing request body",
        invalid="invalid JSON",
        kind=lambda body: _guess_kind(body, endpoint),
        fail=_fail,
    )
    if isinstance(call, web.Response):
        return call
    state = request.app[STATE]
    rec = state.stats.record_request(call.model, request.headers.get(TASK_HEADER), call.kind)
    return await _serve(request, state, call, rec, started)


def _wants_thinking(think: Any) -> bool:
    return think is True or think in ("high", "medium", "low")


async def _serve(
    request: web.Request,
    state: SimState,
    call: CompletionCall,
    rec: RequestRecord,
    started: float,
    *,
    fail: Fail = _fail,
    make_reply: ReplyFactory | None = None,
) -> web.StreamResponse:
    """Serve a parsed call; ``fail`` and ``make_reply`` shape errors and replies.

    The defaults speak Ollama's format; the OpenAI endpoints (openai_api.py)
    pass their own, so both share the engine, the cost model and the faults.
    """
    spec = state.profile.spec(call.model)
    if spec is None:
        return fail(rec, 404, f'model "{call.model}" not found, try pulling it first')
    if call.kind == "unload":
        state.engine.expire(spec.name)
        return await _send_whole(request, rec, lifecycle_object(call, "unload"), "unload")
    if _wants_thinking(call.think) and not spec.thinking:
        return fail(rec, 400, f'"{call.model}" does not support thinking')
    options, num_ctx = call.runner_options(state.profile, spec)

    fault = state.faults.pick() if call.kind == "chat" else None
    if fault is not None:
        rec.fault = fault.kind
        state.stats.note_fault(fault.kind)
        if fault.kind == "500":
            return fail(rec, 500, ERR_500)
        if fault.kind == "503":
            return fail(rec, 503, ERR_MAX_QUEUE)
        if fault.kind == "drop" and fault.early:
            return _drop(request, None)
        if fault.kind == "hang" and not await _hang(state):
            return _drop(request, None)

    try:
        runner = await state.engine.acquire(spec, options, num_ctx, call.keep_alive)
    except QueueFull as exc:
        return fail(rec, 503, str(exc))
    try:
        loaded = time.monotonic()
        if call.kind == "load":
            return await _send_whole(request, rec, lifecycle_object(call, "load"), "load")
        if not valid_format(call.format):
            # Checked by the runner once the model is loaded (llm/llama_server.go): a 500
            # after the load's time is spent, not a 400 up front.
            return fail(rec, 500, f"invalid format: {call.format!r}; {ERR_FORMAT_TAIL}")
        reply = (make_reply or _Reply)(request, call, rec)
        return await _run(request, state, call, rec, runner, started, loaded, fault, reply)
    finally:
        state.engine.release(runner)


async def _hang(state: SimState) -> bool:
    """Send nothing for ``hang_s`` (or until shutdown); False if the server is stopping."""
    seconds = state.faults.faults.hang_s
    closing = state.engine.closing
    if seconds is None:
        await closing.wait()
        return False
    try:
        await asyncio.wait_for(closing.wait(), timeout=seconds)
    except TimeoutError:
        return True
    return False


async def _run(
    request: web.Request,
    state: SimState,
    call: CompletionCall,
    rec: RequestRecord,
    runner: Runner,
    started: float,
    loaded: float,
    fault: FaultChoice | None,
    reply: _Reply,
) -> web.StreamResponse:
    spec = runner.spec
    speed = state.speed
    key = request_key(spec.name, call.content(), call.format, call.options.get("seed"))
    plan = plan_output(
        key, mean_tokens=spec.mean_output_tokens, fmt=call.format, num_predict=call.num_predict()
    )
    tokens = plan.tokens
    n_prompt = prompt_tokens(call.prompt_chars())
    broken = fault is not None and (
        fault.kind in ("midstream", "silent") or (fault.kind == "drop" and not fault.early)
    )
    limit = max(1, len(tokens) // 2) if broken else len(tokens)

    # Thinking models think unless told not to (think absent or true, or a level):
    # the reasoning streams first and costs decode time like any output (routes.go).
    thinks = spec.thinking and call.think is not False and call.endpoint == "chat"
    n_thought = max(1, len(tokens) // 4) if thinks else 0
    thought = [f"step {n} " for n in range(n_thought)]

    async def emit(start: int, end: int) -> None:
        if start < n_thought:
            await reply.thought("".join(thought[start : min(end, n_thought)]))
        if end > n_thought:
            await reply.chunk("".join(tokens[max(start, n_thought) - n_thought : end - n_thought]))

    async with runner.slot(state.stats, call.prompt_text()) as shared_chars:
        # The slot's cached prefix is not evaluated again (at least one token is).
        cached = min(n_prompt - 1, prompt_tokens(shared_chars)) if shared_chars else 0
        n_eval = n_prompt - cached
        reply.cached_tokens = cached
        began_prompt = time.monotonic()
        prompt_s = n_eval / spec.prompt_tps / speed
        # Phases run back to back on the model's clock: decoding is due to start
        # when the prompt is due to end, so a late wake-up is not added twice.
        due = began_prompt + (prompt_s if math.isfinite(prompt_s) else 0.0)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        began_eval = time.monotonic()
        await runner.pace(n_thought + limit, speed, emit, start=due)
        ended_eval = time.monotonic()

    if fault is not None and fault.kind == "midstream":
        return await reply.fail(ERR_MIDSTREAM)
    if fault is not None and fault.kind == "silent" and call.stream:
        return await reply.end_silently()
    metrics = {
        "total_duration": _ns(time.monotonic() - started),
        "load_duration": _ns(loaded - started),
        "prompt_eval_count": n_eval,  # Ollama counts what it evaluated, not the cache
        "prompt_eval_duration": _ns(began_eval - began_prompt),
        "eval_count": n_thought + limit,
        "eval_duration": _ns(ended_eval - began_eval),
    }
    text = "" if call.stream else "".join(reply.parts)
    context = context_tokens(key, n_prompt + limit) if call.endpoint == "generate" else None
    final = final_object(call, text, plan.done_reason, metrics, context)
    if reply.thinking and not call.stream and call.endpoint == "chat":
        final["message"]["thinking"] = "".join(reply.thinking)
    if broken:
        return await reply.cut(final)
    return await reply.finish(final, plan.done_reason)


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))
