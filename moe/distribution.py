"""Expert parallelism: `MoELayer`'s experts sharded over devices.

`MoELayer` stores its routed experts stacked, experts axis first, one
variable per matrix (`expert_in_kernel` is `(num_experts, d, hidden)`).
Expert parallelism puts `num_experts / n` whole experts on each of the `n`
devices of a mesh axis: a `keras.distribution.LayoutMap` lays those
variables out along the axis, and `keras.distribution.ModelParallel` with
that map shards them (and their optimizer states) while every other weight
is replicated; the compiler (XLA's GSPMD) adds the communication. A second
mesh axis can split the batch (data parallelism) at the same time.

Shared experts (`num_shared_experts`) run on every input, so they stay
replicated like the router. LoRA adapters of the experts
(`Experts.enable_lora`: `expert_in_lora_a` `(num_experts, d, rank)`, ...)
are split with their experts. The same map covers keras-hub models made
sparse by `moe.keras_hub.sparsify`, whose experts are `MoELayer` variables
(`transformer_layer_0/<block>/moe/experts/expert_in_kernel`): build and
sparsify them under the distribution's scope.

`keras.distribution` runs on the JAX backend only (Keras 3.15: the
TensorFlow module is an unfinished prototype and PyTorch has none); on
TensorFlow, `model.py --strategy` (`tf.distribute`) gives data parallelism.
"""

import keras

# `LayoutMap` keys are regular expressions that must match a variable's
# whole path, e.g. "moe/expert_in_kernel", "block_0/moe/expert_out_bias" or
# "moe/experts/expert_in_lora_a" (not "moe/shared_expert_in_kernel").
EXPERT_KERNEL_PATH = r"(?:.*/)?expert_(?:in|gate|out)_(?:kernel|lora_[ab])"
EXPERT_BIAS_PATH = r"(?:.*/)?expert_(?:in|gate|out)_bias"


def expert_layout_map(device_mesh, expert_axis="experts"):
    """A `LayoutMap` sharding every `MoELayer`'s routed experts.

    Kernels `(num_experts, d, hidden)` and their LoRA adapters get the
    layout `(expert_axis, None, None)` and biases `(num_experts, hidden)`
    `(expert_axis, None)`; other variables have no entry (replicated). Add
    entries of your own to the returned map as usual.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `expert_axis`.
        expert_axis: name of the mesh axis the experts are split over.
            Defaults to `"experts"`.

    Returns:
        A `keras.distribution.LayoutMap`.

    Raises:
        ValueError: the mesh has no axis `expert_axis`.

    Example:

        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "experts"])
        layout_map = expert_layout_map(mesh)
        layout_map["moe/expert_in_kernel"].axes  # ("experts", None, None)
    """
    if expert_axis not in device_mesh.axis_names:
        raise ValueError(
            f"The device mesh has no axis {expert_axis!r} to split the "
            f"experts over. Received: axis_names={device_mesh.axis_names}"
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[EXPERT_KERNEL_PATH] = (expert_axis, None, None)
    layout_map[EXPERT_BIAS_PATH] = (expert_axis, None)
    return layout_map


def expert_parallel(
    expert_shards=None,
    device_mesh=None,
    expert_axis="experts",
    batch_axis="batch",
):
    """A `ModelParallel` distribution sharding experts across devices.

    Without `device_mesh`, all devices form a mesh of shape
    `(devices / expert_shards, expert_shards)` with axes
    `(batch_axis, expert_axis)`: `expert_shards` devices split each MoE
    layer's experts, and the batch is split over the other axis.

    Args:
        expert_shards: devices the experts of a layer are split over
            (`num_experts` must be a multiple). Defaults to all devices.
            Only without `device_mesh`.
        device_mesh: optional `keras.distribution.DeviceMesh` with axes
            `expert_axis` and `batch_axis`.
        expert_axis: Defaults to `"experts"`.
        batch_axis: mesh axis the batch is split over. Defaults to
            `"batch"`.

    Returns:
        An `ExpertParallel` distribution (a `keras.distribution.
        ModelParallel`): build, train, save and predict under its
        `scope()`, or after `keras.distribution.set_distribution(...)`.

    Raises:
        ValueError: not the JAX backend, or a mesh that does not fit.

    Example:

        # XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU
        distribution = moe.distribution.expert_parallel(expert_shards=2)
        with distribution.scope():
            model = build_model()  # experts 0-3 on devices 0,2; 4-7 on 1,3
            model.compile(...)
            model.fit(dataset)
        model.save("model.keras")  # loads on one device, as usual
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            "Expert parallelism uses keras.distribution, which runs on the "
            "JAX backend only; set KERAS_BACKEND=jax (on TensorFlow, "
            "`model.py --strategy` gives data parallelism). "
            f"Received: backend {backend!r}"
        )
    if device_mesh is None:
        devices = keras.distribution.list_devices()
        shards = len(devices) if expert_shards is None else expert_shards
        if not isinstance(shards, int) or shards < 1 or len(devices) % shards:
            raise ValueError(
                f"`expert_shards` must divide the {len(devices)} devices. "
                f"Received: expert_shards={expert_shards}"
            )
        device_mesh = keras.distribution.DeviceMesh(
            (len(devices) // shards, shards),
            [batch_axis, expert_axis],
            devices,
        )
    elif expert_shards is not None:
        raise ValueError(
            "Give `expert_shards` or `device_mesh`, not both: the mesh's "
            f"{expert_axis!r} axis is the expert shards. "
            f"Received: expert_shards={expert_shards}"
        )
    if batch_axis not in device_mesh.axis_names:
        raise ValueError(
            f"The device mesh has no axis {batch_axis!r} to split the batch "
            f"over. Received: axis_names={device_mesh.axis_names}"
        )
    return ExpertParallel(
        layout_map=expert_layout_map(device_mesh, expert_axis),
        batch_dim_name=batch_axis,
        expert_axis=expert_axis,
    )


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` that checks each expert variable divides evenly.

    Made by `expert_parallel()`. A variable laid out on `expert_axis` must
    have a multiple of that axis's size as its first dimension
    (`num_experts`); otherwise this raises a `ValueError` naming the layer
    setting instead of the compiler's error about uneven shards.

    Args:
        expert_axis: the mesh axis the experts are split over.
        **kwargs: `keras.distribution.ModelParallel` arguments.
    """

    def __init__(self, *, expert_axis="experts", **kwargs):
        super().__init__(**kwargs)
        self.expert_axis = expert_axis

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        axes = getattr(layout, "axes", ())
        if axes and axes[0] == self.expert_axis:
            shards = self.device_mesh.shape[
                self.device_mesh.axis_names.index(self.expert_axis)
            ]
            if variable.shape[0] % shards:
                raise ValueError(
                    f"`num_experts` ({variable.shape[0]}) must be a multiple "
                    f"of the {shards} devices of the mesh's "
                    f"{self.expert_axis!r} axis to shard "
                    f"{variable.path!r}; change num_experts or "
                    "expert_shards"
                )
        return layout
