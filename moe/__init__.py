"""`moe`: truly sparse, serializable Mixture-of-Experts layers for Keras 3.

The public names are imported on first use (PEP 562), so `import moe` and
`import moe.lm.text.tokenizer` stay cheap: importing Keras imports its backend
(TensorFlow), which takes seconds, and the next-word CLIs check their input
before paying for it. The layers are imported (and so registered with
Keras) as soon as Keras is, whichever of the two is imported first, so that
`keras.saving.load_model` finds them without `custom_objects`.
"""

from moe._lazy import call_after_import, exports

# Public name -> the module that defines it.
_PUBLIC = {
    "Experts": "moe.experts",
    "GatingNetwork": "moe.gating_network",
    "LayerExperts": "moe.layer_experts",
    "MoELayer": "moe.moe_layer",
    "MoETransformerBlock": "moe.transformer",
    "Router": "moe.routers",
    "routers": "moe.routers",
    "expert_layout_map": "moe.distribution",
    "expert_parallel": "moe.distribution",
    # Submodules, imported on first use (`moe.convert.from_transformers`);
    # `moe.keras_hub` needs keras-hub (the `keras-hub` extra).
    "convert": "moe.convert",
    "keras_hub": "moe.keras_hub",
}
# The registered Keras classes: what `custom_objects` returns.
_LAYERS = (
    "Experts",
    "GatingNetwork",
    "LayerExperts",
    "MoELayer",
    "MoETransformerBlock",
)

__all__ = sorted([*_PUBLIC, "custom_objects"])
__version__ = "0.1.0"


__getattr__, __dir__ = exports(__name__, _PUBLIC)


def custom_objects():
    """The `custom_objects` dict for `keras.saving.load_model`."""
    objects = {name: __getattr__(name) for name in _LAYERS}
    routers = __getattr__("routers")
    objects.update(
        {
            n: getattr(routers, n)
            for n in routers.__all__
            if n.endswith("Router")
        }
    )
    return objects


call_after_import("keras", custom_objects, package=__name__)
