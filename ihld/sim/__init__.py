"""A built-in Ollama simulator: Ollama's HTTP API and scheduling, with a cost model.

It backs ``ihld demo``, the benchmarks and the tests: deterministic answers,
load times, token timing, parallel slots, max loaded models, keep_alive
expiry, a bounded load queue answering 503, and injected faults. See
``docs/simulator.md`` for the cost model and every figure's source.
"""

from ihld.sim.faults import Faults
from ihld.sim.profiles import PROFILES, ModelSpec, Profile, get_profile
from ihld.sim.server import SimHandle, build_app, run_sim, start_sim

__all__ = [
    "PROFILES",
    "Faults",
    "ModelSpec",
    "Profile",
    "SimHandle",
    "build_app",
    "get_profile",
    "run_sim",
    "start_sim",
]
