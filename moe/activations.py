"""Expert activations: Keras's, plus the ones open MoE models use that
Keras does not have, by name.

`get` and `serialize` stand in for `keras.activations.get` / `serialize`
in the layers' constructors and `get_config`: a name of `ACTIVATIONS`
resolves here and is saved as that name, anything else is Keras's.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="moe")
def quick_gelu(x):
    """`x * sigmoid(1.702 * x)`: the sigmoid approximation of GELU.

    The gate activation of GPT-OSS's clamped SwiGLU experts (and of CLIP);
    `1.702` is GPT-OSS's `swiglu_alpha`.

    References:
        Hendrycks and Gimpel, 2016, "Gaussian Error Linear Units (GELUs)".
    """
    return x * ops.sigmoid(1.702 * x)


# name -> activation, for the names Keras does not know.
ACTIVATIONS = {"quick_gelu": quick_gelu}


def get(identifier):
    """An activation from a name of `ACTIVATIONS`, or whatever
    `keras.activations.get` takes."""
    if isinstance(identifier, str) and identifier in ACTIVATIONS:
        return ACTIVATIONS[identifier]
    return keras.activations.get(identifier)


def serialize(activation):
    """The name of an activation of `ACTIVATIONS`, else Keras's
    serialization."""
    for name, function in ACTIVATIONS.items():
        if activation is function:
            return name
    return keras.activations.serialize(activation)
