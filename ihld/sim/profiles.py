"""What the simulated hardware and models cost: sizes, load times, token rates.

A profile stands for one machine running Ollama: which models are installed,
what each one costs to load and to run, and the server settings that shape
scheduling (``OLLAMA_NUM_PARALLEL``, ``OLLAMA_MAX_LOADED_MODELS``, VRAM,
``OLLAMA_MAX_QUEUE``, ``OLLAMA_KEEP_ALIVE``). Every figure is explained, with
its source, in ``docs/simulator.md``; change the two together.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3

# Aggregate decode speed-up of one loaded model serving k streams at once,
# k = 1..4: llama.cpp's batched-bench sample results (LLaMA 7B, PP 128, TG 128:
# S_TG 41.57 / 50.90 / 74.44 t/s at B = 1 / 2 / 4; B = 3 interpolated).
LLAMACPP_BATCHED_CURVE: tuple[float, ...] = (1.0, 1.22, 1.51, 1.79)


@dataclass(frozen=True)
class ModelSpec:
    """One installed model and what it costs on the profile's hardware.

    Rates are for a single stream; ``throughput`` gives the aggregate speed-up
    at k concurrent streams (k beyond the tuple uses its last value), so each
    of k streams decodes at ``gen_tps * throughput[k-1] / k``.
    """

    name: str
    size_bytes: int
    load_s: float
    prompt_tps: float
    gen_tps: float
    throughput: tuple[float, ...] = (1.0,)
    mean_output_tokens: int = 300
    digest: str = ""
    family: str = "llama"
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 8192
    thinking: bool = False

    def speedup(self, streams: int) -> float:
        """Aggregate decode speed-up with ``streams`` concurrent requests."""
        if streams <= 1 or not self.throughput:
            return 1.0
        return self.throughput[min(streams, len(self.throughput)) - 1]


@dataclass(frozen=True)
class Profile:
    """A simulated Ollama host: its models and its scheduling settings.

    ``vram_bytes`` 0 means memory never limits residency (only
    ``max_loaded`` does). ``default_keep_alive`` is in (simulated) seconds.
    """

    name: str
    description: str
    models: tuple[ModelSpec, ...]
    slots: int = 1
    max_loaded: int = 3
    vram_bytes: int = 0
    max_queue: int = 512
    default_keep_alive: float = 300.0
    default_num_ctx: int = 4096

    def spec(self, model: str) -> ModelSpec | None:
        """The model named ``model`` (Ollama's ``:latest`` default tag applied)."""
        name = model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
        for spec in self.models:
            if spec.name == name:
                return spec
        return None

    def with_overrides(
        self,
        *,
        slots: int | None = None,
        max_loaded: int | None = None,
        vram_bytes: int | None = None,
        max_queue: int | None = None,
        default_keep_alive: float | None = None,
    ) -> Profile:
        """A copy with the given server settings replaced (None keeps the profile's)."""
        changes: dict[str, int | float] = {}
        if slots is not None:
            changes["slots"] = slots
        if max_loaded is not None:
            changes["max_loaded"] = max_loaded
        if vram_bytes is not None:
            changes["vram_bytes"] = vram_bytes
        if max_queue is not None:
            changes["max_queue"] = max_queue
        if default_keep_alive is not None:
            changes["default_keep_alive"] = default_keep_alive
        new = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        new.check()
        return new

    def check(self) -> None:
        """Raise ValueError if a setting is out of range."""
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {self.max_loaded}")
        if self.vram_bytes < 0:
            raise ValueError(f"vram_bytes must be >= 0, got {self.vram_bytes}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.models:
            raise ValueError("a profile needs at least one model")


# --- the models -------------------------------------------------------------
# Sizes, digests and details are those Ollama's /api/tags reports for the
# library tags. Load time is proportional to size (2.0 s for 4.68 GB and
# 2.3 s for 5.44 GB from the user's story are both ~0.425 s/GB). Decode is
# memory-bandwidth bound, so prompt and token rates scale inversely with size;
# the one free constant is calibrated so the user's job-by-job debate costs
# 15.7 s/job (see docs/simulator.md, "laptop-6gb").

QWEN25_7B = ModelSpec(
    name="qwen2.5:7b",
    size_bytes=4_683_087_332,
    load_s=2.0,
    prompt_tps=1500.0,
    gen_tps=89.4,
    digest="845dbda0ea48ed749caafd9e6037047aa19acfcfd82e704d7ca97d631a0b697e",
    family="qwen2",
    parameter_size="7.6B",
    quantization_level="Q4_K_M",
    context_length=32768,
)

GEMMA2_9B = ModelSpec(
    name="gemma2:9b",
    size_bytes=5_443_152_417,
    load_s=2.3,
    prompt_tps=1290.0,
    gen_tps=76.9,
    digest="ff02c3702f322b9e075e9568332d96c0a7028002f1a5a056e0a6784320a4db0b",
    family="gemma2",
    parameter_size="9.2B",
    quantization_level="Q4_0",
    context_length=8192,
)

LLAMA32_3B = ModelSpec(
    name="llama3.2:3b",
    size_bytes=2_019_393_189,
    load_s=0.86,
    prompt_tps=3480.0,
    gen_tps=207.0,
    digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    family="llama",
    parameter_size="3.2B",
    quantization_level="Q4_K_M",
    context_length=131072,
)


def _curved(spec: ModelSpec, curve: tuple[float, ...]) -> ModelSpec:
    return dataclasses.replace(spec, throughput=curve)


def _instant(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, load_s=0.0, prompt_tps=float("inf"), gen_tps=float("inf"))


PROFILES: dict[str, Profile] = {
    "laptop-6gb": Profile(
        name="laptop-6gb",
        description=(
            "The user's laptop: qwen2.5:7b and gemma2:9b on a 6 GB GPU; they cannot "
            "be resident together; one request at a time (15.7 s per 3-stage job "
            "run job by job)."
        ),
        models=(QWEN25_7B, GEMMA2_9B),
        slots=1,
        max_loaded=1,
        vram_bytes=6 * GIB,
    ),
    "laptop-6gb-4slot": Profile(
        name="laptop-6gb-4slot",
        description=(
            "laptop-6gb with OLLAMA_NUM_PARALLEL=4; concurrent streams share the GPU "
            "along llama.cpp's batched-decoding curve."
        ),
        models=(
            _curved(QWEN25_7B, LLAMACPP_BATCHED_CURVE),
            _curved(GEMMA2_9B, LLAMACPP_BATCHED_CURVE),
        ),
        slots=4,
        max_loaded=1,
        vram_bytes=6 * GIB,
    ),
    "three-models": Profile(
        name="three-models",
        description=(
            "An 8 GB GPU with qwen2.5:7b, gemma2:9b and llama3.2:3b: any 7B/9B fits "
            "beside the 3B, the 7B and 9B never fit together (two resident at most)."
        ),
        models=(QWEN25_7B, GEMMA2_9B, LLAMA32_3B),
        slots=1,
        max_loaded=3,
        vram_bytes=8 * GIB,
    ),
    "instant": Profile(
        name="instant",
        description=("Same models, every load and token free: measures ihld's own overhead."),
        models=(_instant(QWEN25_7B), _instant(GEMMA2_9B), _instant(LLAMA32_3B)),
        slots=4,
        max_loaded=3,
        vram_bytes=0,
    ),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``, or the one in the JSON file ``name`` (``ihld calibrate``
    writes them); KeyError names the built-in ones."""
    if name.endswith(".json"):
        try:
            return load_profile_file(name)
        except ValueError as exc:
            raise KeyError(str(exc)) from None
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise KeyError(f"unknown simulator profile {name!r}; known: {known}") from None


# --- profiles measured on a real server (``ihld calibrate``) -------------------


def profile_to_json(profile: Profile) -> dict[str, Any]:
    """A profile as JSON: its fields and its models' fields."""
    data = dataclasses.asdict(profile)
    for model in data["models"]:
        model["throughput"] = list(model["throughput"])
    return data


def load_profile_file(path: str | Path) -> Profile:
    """The profile in a JSON file; ValueError naming the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        models = tuple(
            ModelSpec(**{**m, "throughput": tuple(m.get("throughput", (1.0,)))})
            for m in data.pop("models")
        )
        profile = Profile(models=models, **data)
        profile.check()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a simulator profile: {exc}") from None
    return profile
