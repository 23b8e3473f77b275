"""The Messages API simulator: a real aiohttp server faithful to Anthropic's prompt caching.

It keeps its own implementation of prefix identity (it imports nothing of the proxy's but
``specproxy.errors`` and ``specproxy.serving``), so that a proxy bug shows up as a wrong cache
counter. See ``docs/simulator.md``.
"""

from specproxy.sim.app import create_sim_app, run_sim_server
from specproxy.sim.cache import CachePlan, PromptCache, Usage
from specproxy.sim.gates import Gates, SimClosing
from specproxy.sim.messages import SIM_STATE
from specproxy.sim.profile import DEFAULT_MODELS, ModelSpec, ProfileError, SimProfile, load_profile
from specproxy.sim.state import SimState, tenant_digest

__all__ = [
    "DEFAULT_MODELS",
    "SIM_STATE",
    "CachePlan",
    "Gates",
    "ModelSpec",
    "ProfileError",
    "PromptCache",
    "SimClosing",
    "SimProfile",
    "SimState",
    "Usage",
    "create_sim_app",
    "load_profile",
    "run_sim_server",
    "tenant_digest",
]
