import inspect

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="moe")
class LayerExperts(keras.layers.Layer):
    """Experts that are arbitrary Keras layers or models (an ensemble).

    The counterpart of `moe.Experts` for experts that are not feed-forward
    networks of one shape: any layer (a `Dense`, a `Sequential`, a
    functional model, another `MoELayer` for a nested, hierarchical MoE)
    mapping `(n, d)` inputs to `(n, d_out)`, the same `d_out` for all.
    `MoELayer(experts=[...])` wraps its list in one.

    Each expert still runs only on the inputs routed to it, but one expert
    at a time: a Python loop of `num_experts` calls to `run_expert`
    (`moe.dispatch.layer_loop`), not the batched matmuls of `Experts`, so
    it is the slower path. With dynamic shapes
    (eager, TensorFlow graphs, PyTorch) each expert gets exactly its
    inputs; under a compiler (JAX `jit`, XLA) it gets a static buffer of
    `capacity` rows (all the inputs when dropless) whose unused rows are
    zeros. A layer that supports masking (an `MoELayer`) is told which rows
    are real, so a nested MoE neither routes nor counts the padding. Each
    expert's output is cast to this layer's compute dtype (the `MoELayer`'s)
    and must have as many rows as its inputs (checked where the row count
    is known while tracing: always eagerly and under a compiler).

    Args:
        layers: a list of Keras layers, one per expert.
        **kwargs: base layer arguments.

    Call arguments:
        inputs: `(..., d)`.
        training: passed to every expert.

    Returns:
        `(num_experts, ..., d_out)`: every expert's output.

    Example:

    >>> experts = LayerExperts([keras.layers.Dense(4), keras.layers.Dense(4)])
    >>> tuple(experts(keras.ops.ones((3, 6))).shape)
    (2, 3, 4)
    """

    def __init__(self, layers, **kwargs):
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(
                "`layers` must be a non-empty list of Keras layers. "
                f"Received: layers={layers!r}"
            )
        layers = [
            keras.saving.deserialize_keras_object(la)
            if isinstance(la, dict)
            else la
            for la in layers
        ]
        for i, layer in enumerate(layers):
            if not isinstance(layer, keras.layers.Layer):
                raise ValueError(
                    f"Every expert must be a Keras layer; expert {i} is "
                    f"not. Received: layers[{i}]={layer!r}"
                )
        if len({id(la) for la in layers}) != len(layers):
            raise ValueError(
                "Each expert must be its own layer (the same layer twice "
                "would be one expert with two indices). Received: "
                f"layers={[la.name for la in layers]}"
            )
        super().__init__(**kwargs)
        self.expert_layers = list(layers)
        self.num_experts = len(layers)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        spec = keras.KerasTensor((None, input_dim), dtype=self.compute_dtype)
        widths = []
        for layer in self.expert_layers:
            if not layer.built:
                layer.build((None, input_dim))
            shape = tuple(layer.compute_output_spec(spec).shape)
            if len(shape) != 2 or shape[0] is not None:
                raise ValueError(
                    "Every expert must map `(n, d)` inputs to `(n, d_out)`. "
                    f"Received: expert {layer.name!r} with output shape "
                    f"{shape} for inputs {(None, input_dim)}"
                )
            widths.append(shape[-1])
        if len(set(widths)) != 1:
            names = [la.name for la in self.expert_layers]
            raise ValueError(
                "Every expert must have the same output width. Received: "
                f"widths {dict(zip(names, widths))}"
            )
        self.output_dim = widths[0]

    def run_expert(self, e, x, rows_real=None, training=None):
        """Expert `e` on the rows `x` `(n, d)` -> `(n, d_out)` in this
        layer's compute dtype; `rows_real` (bool `(n,)`) marks the rows
        that are not padding, for an expert that supports masking. The
        dispatch (`moe.dispatch.layer_loop`) calls it once per expert."""
        layer = self.expert_layers[e]
        kwargs = {}
        parameters = inspect.signature(layer.call).parameters
        if (
            rows_real is not None
            and layer.supports_masking
            and "mask" in parameters
        ):
            kwargs["mask"] = rows_real
        if "training" in parameters:
            kwargs["training"] = training
        y = layer(x, **kwargs)
        rows, out_rows = x.shape[0], y.shape[0]
        if rows is not None and out_rows is not None and rows != out_rows:
            # Fewer rows would be broadcast onto the tokens silently.
            raise ValueError(
                "Every expert must return one row per input row. Received: "
                f"expert {layer.name!r} returned {out_rows} rows for {rows} "
                f"(output shape {tuple(y.shape)})"
            )
        # An expert with its own dtype policy (e.g. float16 layers in a
        # float32 `MoELayer`) still gives the layer's compute dtype.
        return ops.cast(y, self.compute_dtype)

    def call(self, inputs, training=None):
        x = ops.reshape(inputs, (-1, ops.shape(inputs)[-1]))
        y = ops.stack(
            [
                self.run_expert(e, x, training=training)
                for e in range(self.num_experts)
            ]
        )
        return ops.reshape(
            y,
            (self.num_experts,)
            + tuple(ops.shape(inputs)[:-1])
            + (self.output_dim,),
        )

    def compute_output_shape(self, input_shape):
        return (
            (self.num_experts,) + tuple(input_shape[:-1]) + (self.output_dim,)
        )

    def get_config(self):
        config = super().get_config()
        config["layers"] = [
            keras.saving.serialize_keras_object(la) for la in self.expert_layers
        ]
        return config
