"""Quantized bundles: `model.py --quantize int8` (`quantize_model`).

`keras.Model.quantize("int8")` on the trained next-word model: the word
(and position) embeddings, the output layer, the attention projections and
the experts' stacked kernels (`moe.quantization`: per expert and output
channel) become int8 with float scales; the routers, layer norms and biases
stay float32. A quantized `.keras` file loads like any other, so `serve.py`
serves it as it is.
"""

import warnings

# `model.py --quantize` / `serve.py --quantize`.
QUANTIZE_MODES = ("none", "int8", "int8-weights")


def quantize_model(model, mode: str) -> None:
    """Quantizes the built `model` in place to `mode` (`QUANTIZE_MODES`).

    `"int8"` is Keras's int8: weights and, per row, the inputs of each
    matmul. `"int8-weights"` keeps the inputs float (the kernels are cast
    back for a float matmul): the same size, and CPU backends without fast
    int8 matmuls run it at float speed. `"none"` leaves `model` float.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(
            f"`mode` must be one of {', '.join(QUANTIZE_MODES)}. "
            f"Received: mode={mode!r}"
        )
    if mode == "none":
        return
    config = None
    if mode == "int8-weights":
        import keras

        config = keras.quantizers.Int8QuantizationConfig(
            activation_quantizer=None
        )
    with warnings.catch_warnings():
        # Keras warns once per leaf layer it has no `mode` for (inputs,
        # dropout, pooling, layer norms): those stay float by design.
        warnings.filterwarnings("ignore", "Layer .* does not have a `quantize`")
        model.quantize("int8", config=config)


def is_quantized(model) -> bool:
    """Whether any layer of `model` holds quantized weights."""
    return any(
        layer.quantization_mode is not None for layer in model._flatten_layers()
    )
