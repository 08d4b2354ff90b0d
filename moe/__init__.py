"""`moe`: truly sparse, serializable Mixture-of-Experts layers for Keras 3."""

from moe.distribution import expert_layout_map, expert_parallel
from moe.gating_network import GatingNetwork
from moe.moe_layer import MoELayer
from moe.transformer import MoETransformerBlock

__all__ = [
    "GatingNetwork",
    "MoELayer",
    "MoETransformerBlock",
    "custom_objects",
    "expert_layout_map",
    "expert_parallel",
]
__version__ = "0.1.0"


def custom_objects():
    """The `custom_objects` dict for `keras.saving.load_model`."""
    return {
        "GatingNetwork": GatingNetwork,
        "MoELayer": MoELayer,
        "MoETransformerBlock": MoETransformerBlock,
    }
