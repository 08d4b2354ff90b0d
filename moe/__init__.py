"""`moe`: truly sparse, serializable Mixture-of-Experts layers for Keras 3."""

from moe.gating_network import GatingNetwork
from moe.moe_layer import MoELayer

__all__ = ["GatingNetwork", "MoELayer", "custom_objects"]
__version__ = "0.1.0"


def custom_objects():
    """The `custom_objects` dict for `keras.saving.load_model`."""
    return {"GatingNetwork": GatingNetwork, "MoELayer": MoELayer}
