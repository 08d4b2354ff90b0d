"""`moe`: truly sparse, serializable Mixture-of-Experts layers for Keras 3."""

from moe import routers
from moe.distribution import expert_layout_map, expert_parallel
from moe.experts import Experts
from moe.gating_network import GatingNetwork
from moe.layer_experts import LayerExperts
from moe.moe_layer import MoELayer
from moe.routers import Router
from moe.transformer import MoETransformerBlock

__all__ = [
    "Experts",
    "GatingNetwork",
    "LayerExperts",
    "MoELayer",
    "MoETransformerBlock",
    "Router",
    "custom_objects",
    "expert_layout_map",
    "expert_parallel",
    "routers",
]
__version__ = "0.1.0"


def custom_objects():
    """The `custom_objects` dict for `keras.saving.load_model`."""
    objects = {
        "Experts": Experts,
        "GatingNetwork": GatingNetwork,
        "LayerExperts": LayerExperts,
        "MoELayer": MoELayer,
        "MoETransformerBlock": MoETransformerBlock,
    }
    objects.update(
        {
            name: getattr(routers, name)
            for name in routers.__all__
            if name.endswith("Router")
        }
    )
    return objects
