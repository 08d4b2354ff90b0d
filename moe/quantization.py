"""int8 experts through Keras's quantization API (`model.quantize("int8")`).

`keras.Model.quantize(mode)` calls `quantize(mode)` on every leaf layer.
`moe.Experts` answers it (see its `quantize`): each stacked kernel
`(E, d_in, d_out)` becomes an int8 kernel and a float scale `(E, d_out)`,
one per expert and output channel, abs-max as `keras.layers.Dense` does
(`q = round(w * scale)`, `scale = 127 / max |w[e, :, j]|`, `w ~ q / scale`).
The dispatch layouts slice the scales with the kernels, so each token still
meets only its chosen experts; the scales are applied after the matmul.
Inputs are quantized per row (abs-max) for an int8 x int8 matmul, like
Dense, unless the `config` has no activation quantizer (weight-only).

Routers stay float32: their scores pick the experts, and a small error
there changes which expert computes, not just a rounding of the output.
Their leaf layers answer `quantize` with `keep_float` (a no-op).

Keras rebuilds a saved layer's sublayers from the layer's own arguments,
so a quantized sublayer (the experts of an `MoELayer`, the attention of an
`MoETransformerBlock`) would come back float and refuse its int8 weights.
The composite layers save `quantized_sublayers(self)` in their config and
call `restore_sublayers` at the end of `build`, before the weights load.
"""

import keras
from keras import ops

# The modes `moe.Experts` quantizes to.
MODES = ("int8",)


def check_mode(layer, mode):
    """Raises unless `layer` (built, not yet quantized) can take `mode`.

    Raises:
        ValueError: not built, already quantized, or not a Keras mode.
        NotImplementedError: a Keras mode other than `MODES`;
            `model.quantize` turns it into a warning and leaves the layer
            float, as it does for any layer without that mode.
    """
    layer._check_quantize_args(mode, layer.compute_dtype)
    if mode not in MODES:
        raise NotImplementedError(
            f"`{type(layer).__name__}` '{layer.name}' quantizes to "
            f"{', '.join(MODES)} only; it stays {layer.compute_dtype}. "
            f"Received: mode={mode!r}"
        )


def keep_float(layer, mode):
    """`quantize` of a layer that stays float (a router): nothing to do,
    whatever the mode; `model.quantize` then neither changes nor warns
    about it."""
    del layer, mode


def inputs_quantizer(config):
    """The activation quantizer of `config` (per row, abs-max by default;
    `None`: weight-only)."""
    return keras.quantizers.QuantizationConfig.activation_quantizer_or_default(
        config, keras.quantizers.AbsMaxQuantizer(axis=-1)
    )


def quantize_experts(experts, mode, config):
    """`moe.Experts.quantize`: each stacked kernel, in place, becomes an int8
    kernel and its scales (`add_int8_kernel`); the dtype policy becomes
    `"int8_from_<policy>"`, as `keras.layers.Dense` does."""
    check_mode(experts, mode)
    experts.quantization_config = config
    kernels = {}
    for name in experts.variable_names():
        if name.endswith("kernel"):
            kernels[name] = quantize_kernel(getattr(experts, name))
            delattr(experts, name)
    experts.inputs_quantizer = inputs_quantizer(config)
    # Created in the order of a quantized `build`: kernels first.
    for name in experts.variable_names(kernels_first=True):
        if name in kernels:
            q, scale = kernels[name]
            add_int8_kernel(experts, name, q.shape[1:])
            getattr(experts, name).assign(q)
            getattr(experts, f"{name}_scale").assign(scale)
    experts._is_quantized = True
    if experts.dtype_policy.quantization_mode is None:
        experts.dtype_policy = keras.dtype_policies.get(
            f"{mode}_from_{experts.dtype_policy.name}"
        )


def add_int8_kernel(layer, name, shape):
    """Adds `layer.<name>`, an int8 `(E,) + shape` kernel, and
    `layer.<name>_scale`, its float `(E, shape[-1])` scales."""
    for suffix, dtype, var_shape, initializer in (
        ("", "int8", shape, "zeros"),
        ("_scale", None, shape[-1:], "ones"),
    ):
        variable = layer.add_weight(
            name=name + suffix,
            shape=(layer.num_experts,) + tuple(var_shape),
            initializer=initializer,
            dtype=dtype,
            trainable=False,
        )
        setattr(layer, name + suffix, variable)


def quantize_kernel(kernel):
    """`(q, scale)`: int8 `(..., d_in, d_out)` and float `(..., d_out)`,
    one scale per leading index (expert) and output channel."""
    q, scale = keras.quantizers.abs_max_quantize(
        kernel, axis=-2, value_range=(-127, 127), dtype="int8", to_numpy=True
    )
    return q, ops.squeeze(scale, axis=-2)


def dequantize(kernel, scale, dtype):
    """The float kernel `kernel / scale` (scale per output channel)."""
    return ops.cast(kernel, dtype) / ops.cast(ops.expand_dims(scale, -2), dtype)


def int8_affine(x, kernel, scale, bias, quantizer, dtype):
    """`x @ (kernel / scale) + bias` on int8 `kernel`, with the leading
    (expert) axes of `x`, `kernel`, `scale` and `bias` aligned.

    With a `quantizer` the inputs are quantized per row and the matmul runs
    in int8 (int32 accumulation); the scales are divided out afterwards.
    """
    scale = ops.cast(ops.expand_dims(scale, -2), dtype)  # (..., 1, d_out)
    if quantizer is None:
        y = ops.matmul(x, ops.cast(kernel, x.dtype))
    else:
        x, x_scale = _quantize_rows(x, quantizer)  # (..., n, d), (..., n, 1)
        y = ops.matmul(x, kernel)  # int32
        scale = scale * ops.cast(x_scale, dtype)
    y = ops.cast(y, dtype) / scale
    if bias is not None:
        y = y + ops.expand_dims(ops.cast(bias, dtype), -2)
    return y


def _quantize_rows(x, quantizer):
    # `quantizer`'s abs-max per row; `initial=0` lets an expert with no
    # rows (an empty group) through, which `ops.max` refuses eagerly.
    low, high = quantizer.value_range
    amax = ops.max(ops.abs(x), axis=-1, keepdims=True, initial=0.0)
    scale = ops.cast(high / (amax + quantizer.epsilon), x.dtype)
    q = ops.clip(ops.round(x * scale), low, high)
    return ops.cast(q, quantizer.output_dtype), scale


def _leaves(layer, prefix=""):
    # (relative name, leaf layer) for every leaf below `layer`.
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        name = f"{prefix}{sub.name}"
        if list(sub._flatten_layers(include_self=False, recursive=False)):
            yield from _leaves(sub, f"{name}/")
        else:
            yield name, sub


def quantized_sublayers(layer):
    """`{relative name: {"mode", "config"}}` of `layer`'s quantized leaves,
    for its `get_config` (empty when none is)."""
    ser = keras.saving.serialize_keras_object
    return {
        name: {
            "mode": sub.quantization_mode,
            "config": ser(getattr(sub, "quantization_config", None)),
        }
        for name, sub in _leaves(layer)
        if sub.quantization_mode is not None
    }


def restore_sublayers(layer, record):
    """Quantizes the built leaves of `layer` named in `record` (from
    `quantized_sublayers`) again, so that their saved weights fit."""
    if not record:
        return
    leaves = dict(_leaves(layer))
    for name, entry in record.items():
        if name not in leaves:
            raise ValueError(
                f"`quantized_sublayers` names '{name}', which "
                f"'{layer.name}' does not have. Its sublayers: {sorted(leaves)}"
            )
        sub = leaves[name]
        if sub.quantization_mode is None:
            config = keras.saving.deserialize_keras_object(entry["config"])
            sub.quantize(entry["mode"], config=config)
