"""The routing names `MoELayer(routing=...)` accepts, and their routers.

This is the one place that maps a routing string to a router: each entry is
the router class, the arguments the routing fixes (a user may leave them
unset or pass the same value) and the routing's own defaults.
"""

import inspect

import keras

from moe.routers.expert_choice_router import ExpertChoiceRouter
from moe.routers.hash_router import HashRouter
from moe.routers.hierarchical_router import HierarchicalRouter
from moe.routers.router import Router
from moe.routers.soft_router import SoftRouter
from moe.routers.top_k_router import TopKRouter
from moe.routing import ROUTINGS

# routing -> (router class, fixed arguments, defaults)
REGISTRY = {
    "top_k": (TopKRouter, {}, {}),
    # Switch Transformer: top-1 with the raw probability as the weight, so
    # that the task loss trains the router even with one expert.
    "switch": (TopKRouter, {"top_k": 1}, {"normalize_top_k": False}),
    "soft": (SoftRouter, {}, {}),
    "expert_choice": (ExpertChoiceRouter, {}, {}),
    "hash": (HashRouter, {"top_k": 1}, {}),
    "hierarchical": (HierarchicalRouter, {}, {}),
}


def _defaults(function):
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# The arguments every router takes (`Router`'s), with their defaults.
COMMON = _defaults(Router.__init__)
# The routing options, with their "unset" values (`TopKRouter` takes them
# all): a routing whose router does not take one refuses any other value.
OPTIONS = {
    name: default
    for name, default in _defaults(TopKRouter.__init__).items()
    if name not in COMMON
}
# Every router argument of `MoELayer`, with its default.
ROUTER_ARGUMENTS = {**COMMON, **OPTIONS}


def make_router(routing, num_experts, name=None, **arguments):
    """The router of a routing name, from `MoELayer`'s arguments.

    Args:
        routing: one of `ROUTINGS`.
        num_experts: int.
        name: the router layer's name, or `None`.
        **arguments: the layer's router arguments: `Router`'s (loss
            weights, capacity, noise, ...) and the routing options
            (`OPTIONS`).

    Returns:
        An unbuilt `Router`.

    Raises:
        ValueError: an unknown routing, or an option the routing does not
            use (or fixes to another value).
    """
    if routing not in REGISTRY:
        raise ValueError(
            f"`routing` must be one of {', '.join(map(repr, ROUTINGS))} or a "
            f"`moe.routers.Router`. Received: routing={routing!r}"
        )
    cls, fixed, defaults = REGISTRY[routing]
    accepted = set(inspect.signature(cls.__init__).parameters)
    accepted |= set(inspect.signature(Router.__init__).parameters)
    kwargs = {n: v for n, v in fixed.items() if n in accepted}
    for arg, value in arguments.items():
        if arg in fixed:
            if value is not None and value != fixed[arg]:
                raise ValueError(
                    f"`routing={routing!r}` uses `{arg}={fixed[arg]}`; "
                    f"leave `{arg}` unset or {fixed[arg]}. "
                    f"Received: {arg}={value!r}"
                )
        elif arg in accepted:
            if value is None and arg in defaults:
                value = defaults[arg]
            kwargs[arg] = value
        elif value != OPTIONS.get(arg):
            raise ValueError(
                f"`{arg}` is not used by `routing={routing!r}`; leave "
                f"`{arg}` unset. Received: {arg}={value!r}"
            )
    return cls(num_experts=num_experts, name=name, **kwargs)


def get(routing):
    """A routing name, a router, or a router's config dict -> the same
    name, or a `Router` (deserialized)."""
    if isinstance(routing, dict):
        routing = keras.saving.deserialize_keras_object(routing)
    if isinstance(routing, str) or isinstance(routing, Router):
        return routing
    raise ValueError(
        f"`routing` must be one of {', '.join(map(repr, ROUTINGS))} or a "
        f"`moe.routers.Router`. Received: routing={routing!r}"
    )


def serialize(routing):
    """What `get_config` stores: the name, or the router's config."""
    if isinstance(routing, Router):
        return keras.saving.serialize_keras_object(routing)
    return routing


def router_argument(router, name):
    """The value a router holds for the `MoELayer` router argument `name`
    (`ROUTER_ARGUMENTS`), or the argument's default when the router takes
    no such argument (e.g. `top_k` of expert choice): what `MoELayer`
    reads and saves under that name."""
    default = ROUTER_ARGUMENTS[name]
    if name == "selection_bias":  # the router's `selection_bias` is the
        name = "use_selection_bias"  # variable; the flag is this
    return getattr(router, name, default)


def router_for(routing, num_experts, name=None, **arguments):
    """The router of an `MoELayer`.

    Args:
        routing: a routing name, a `Router`, or a router's config dict.
        num_experts: the layer's experts.
        name: the name of a router made from a routing name.
        **arguments: the layer's router arguments (`ROUTER_ARGUMENTS`
            names).

    Returns:
        `make_router(routing, ...)` for a name; the router itself for a
        router object, whose settings are its own: then every argument must
        be left at its default or equal the router's (as the layer's
        config, which reads the router, holds them).
    """
    routing = get(routing)
    if isinstance(routing, str):
        return make_router(routing, num_experts, name=name, **arguments)
    for arg, value in arguments.items():
        allowed = [ROUTER_ARGUMENTS[arg], router_argument(routing, arg)]
        if arg == "router_initializer":  # a name, an object or a config
            value, *allowed = (
                keras.initializers.serialize(keras.initializers.get(v))
                for v in (value, *allowed)
            )
        if value not in allowed:
            raise ValueError(
                f"With a router object, `{arg}` is the router's: pass it to "
                f"the router. Received: {arg}={value!r}"
            )
    if routing.num_experts != num_experts:
        raise ValueError(
            f"The router routes to {routing.num_experts} experts but the "
            f"layer has {num_experts}. Received: num_experts={num_experts}"
        )
    return routing
