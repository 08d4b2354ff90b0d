"""Routers of `moe.MoELayer`: which experts compute on which inputs.

One router per routing family, each owning its arguments and their checks,
its decision, its losses and its telemetry; `registry` maps the routing
names to them. Subclass `Router` to write your own.
"""

from moe.decisions import (
    EveryExpert,
    ExpertChoice,
    HierarchicalChoice,
    SoftChoice,
    TokenChoice,
)
from moe.routers.expert_choice_router import ExpertChoiceRouter
from moe.routers.hash_router import HashRouter
from moe.routers.hierarchical_router import HierarchicalRouter
from moe.routers.registry import (
    ROUTER_ARGUMENTS,
    get,
    make_router,
    router_argument,
    router_for,
    serialize,
)
from moe.routers.router import LearnedRouter, Router
from moe.routers.soft_router import SoftRouter
from moe.routers.top_k_router import TopKRouter

__all__ = [
    "ROUTER_ARGUMENTS",
    "EveryExpert",
    "ExpertChoice",
    "ExpertChoiceRouter",
    "HashRouter",
    "HierarchicalChoice",
    "HierarchicalRouter",
    "LearnedRouter",
    "Router",
    "SoftChoice",
    "SoftRouter",
    "TokenChoice",
    "TopKRouter",
    "get",
    "make_router",
    "router_argument",
    "router_for",
    "serialize",
]
