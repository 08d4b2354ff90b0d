"""Reading a block's weights into the variables of an `MoELayer`."""

import numpy as np


def layer_values(family, reader, router_use_bias=False):
    """The layer's variable values, by variable name, from the block's."""
    values = {"router_kernel": reader.read(family.router, "Ed").T}
    if router_use_bias:
        values["router_bias"] = reader.read(family.router_bias, "E")
    if family.selection_bias:
        values["selection_bias"] = reader.read(family.selection_bias, "E")
    values.update(_expert_values(family.experts, reader))
    if family.shared_experts:
        prefix = family.shared_experts
        # One shared MLP: a stack of one expert.
        for part, variable in (
            ("gate_proj", "shared_expert_gate_kernel"),
            ("up_proj", "shared_expert_in_kernel"),
        ):
            kernel = reader.read(f"{prefix}.{part}.weight", "sd").T
            values[variable] = kernel[None]
        down = reader.read(f"{prefix}.down_proj.weight", "ds").T
        values["shared_expert_out_kernel"] = down[None]
    if family.shared_expert_gate:
        gate = reader.read(f"{family.shared_expert_gate}.weight", "1d")
        values["shared_gate_kernel"] = gate.T  # (d, 1)
    return values


def _expert_values(experts, reader):
    # Stacked `(E, in, out)` kernels (and `(E, out)` biases) from either
    # layout.
    biases = {}
    if experts.per_expert is None or (
        experts.fused and reader.has("experts.gate_up_proj")
    ):
        if experts.in_out:
            gate_up = reader.read("experts.gate_up_proj", "Ed2")
            down = reader.read("experts.down_proj", "Ehd")
        else:
            gate_up = np.swapaxes(
                reader.read("experts.gate_up_proj", "E2d"), 1, 2
            )
            down = np.swapaxes(reader.read("experts.down_proj", "Edh"), 1, 2)
        gate, up = split_gate_up(gate_up, experts.interleaved)
        if experts.biases:
            gate_up_bias = reader.read("experts.gate_up_proj_bias", "E2")
            biases["expert_gate_bias"], biases["expert_in_bias"] = (
                split_gate_up(gate_up_bias, experts.interleaved)
            )
            biases["expert_out_bias"] = reader.read(
                "experts.down_proj_bias", "Ed"
            )
    else:
        gate_name, up_name, down_name = experts.per_expert
        up = np.swapaxes(reader.stack(up_name, "hd"), 1, 2)
        down = np.swapaxes(reader.stack(down_name, "dh"), 1, 2)
        gate = None
        if gate_name is not None:
            gate = np.swapaxes(reader.stack(gate_name, "hd"), 1, 2)
    values = {"expert_in_kernel": up, "expert_out_kernel": down, **biases}
    if gate is not None:
        values["expert_gate_kernel"] = gate
    return values


def split_gate_up(gate_up, interleaved):
    """`(..., 2h)` -> the gate's and the up projection's `(..., h)`:
    halves, or (interleaved) the even and the odd columns."""
    if interleaved:
        return gate_up[..., 0::2], gate_up[..., 1::2]
    return np.split(gate_up, 2, axis=-1)


def join_gate_up(gate, up, interleaved):
    """The inverse of `split_gate_up`."""
    if interleaved:
        return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)
    return np.concatenate([gate, up], axis=-1)


def assign(layer, values):
    variables = {}
    for variable in layer.weights:
        if variable.name in variables:
            raise RuntimeError(  # a layer change conversion must follow
                f"`MoELayer` has two variables named {variable.name!r}"
            )
        variables[variable.name] = variable
    unfilled = sorted(set(variables) - set(values))
    unknown = sorted(set(values) - set(variables))
    if unfilled or unknown:
        raise ValueError(
            "The converted layer does not fit the block: the layer arguments "
            f"leave {unfilled} without a weight and have no variable for "
            f"{unknown}. Received: layer variables {sorted(variables)}"
        )
    for name, value in values.items():
        variable = variables[name]
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"The layer variable {name!r} has shape "
                f"{tuple(variable.shape)}, the block's weights give "
                f"{value.shape}: check the layer arguments you passed. "
                f"Received: {name} of shape {value.shape}"
            )
        variable.assign(value)


class WeightReader:
    """Reads the block's weights by name, checking each shape, and finally
    that every weight was read: a weight nobody reads would be silently
    missing from the layer.

    Shapes are strings of dimension letters: `E` experts, `d` model width,
    `h` expert width, `s` shared-experts width, `2` twice the expert width
    (fused gate and up), `1` one.
    """

    def __init__(self, weights, model_type, dims):
        self.weights = weights
        self.model_type = model_type
        self.dims = {**dims, "2": 2 * dims["h"], "1": 1}
        self.read_names = set()

    def has(self, name):
        return name in self.weights

    def read(self, name, shape):
        if name not in self.weights:
            raise ValueError(
                f"The {self.model_type} block needs the weight {name!r}. "
                "Pass the block's state dict with names relative to the block "
                f"(e.g. 'gate.weight'). Received: {_names(self.weights)}"
            )
        value = np.asarray(self.weights[name])
        _check_real_floats(name, value)
        expected = tuple(self.dims[letter] for letter in shape)
        if value.shape != expected:
            raise ValueError(
                f"The weight {name!r} of a {self.model_type} block with this "
                f"config ({self._dims_text()}) has shape {expected}. "
                f"Received: {name} of shape {value.shape}"
            )
        # float32 whatever the checkpoint's dtype: the router computes in
        # float32, and assigning casts the rest to the layer's dtype.
        with np.errstate(over="ignore"):  # `_check_finite` says it
            value = value.astype("float32")
        _check_finite(name, value)
        self.read_names.add(name)
        return value

    def stack(self, pattern, shape):
        # Per-expert `<pattern>.weight` for e = 0 .. E - 1 -> (E, ...).
        return np.stack(
            [
                self.read(f"{pattern.format(e=e)}.weight", shape)
                for e in range(self.dims["E"])
            ]
        )

    def check_allread(self):
        unknown = sorted(set(self.weights) - self.read_names)
        if unknown:
            raise ValueError(
                f"A {self.model_type} block with this config "
                f"({self._dims_text()}) has no weight named "
                f"{', '.join(map(repr, unknown))}: pass the weights of one MoE "
                "block, with names relative to the block. Received: "
                f"{_names(self.weights)}"
            )

    def _dims_text(self):
        names = {"E": "experts", "d": "width", "h": "expert width"}
        return ", ".join(f"{names[k]} {self.dims[k]}" for k in names)


def _check_real_floats(name, value):
    # Casting anything else to float32 would make a wrong layer silently:
    # the integers of an int8 (or float8) tensor are not the weights
    # without their scale, a bool is a mask, a complex loses its imaginary
    # part. bfloat16 (ml_dtypes, NumPy kind "V") is a float.
    dtype = value.dtype
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return
    if dtype.kind in "iu" or dtype.name.startswith("float8"):
        why = (
            "it is quantised (its values are not the weights without their "
            "scale): dequantise it first"
        )
    elif dtype.kind == "b":
        why = "a bool tensor is a mask, not a weight"
    elif dtype.kind == "c":
        why = "a complex tensor has no real equivalent"
    else:
        why = "it does not hold numbers"
    raise ValueError(
        f"The weight {name!r} must hold real floating-point numbers; {why}. "
        f"Received: {name} of dtype {dtype.name}"
    )


def _check_finite(name, value):
    bad = ~np.isfinite(value)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"The weight {name!r} must be finite; it holds "
            f"{int(bad.sum())} NaN or infinite value(s) in float32 (a float64 "
            "beyond float32's range becomes infinite). Received: "
            f"{name}[{', '.join(map(str, first))}]={value[first]}"
        )


def _names(weights):
    names = sorted(weights)
    shown = ", ".join(map(repr, names[:8]))
    return f"weights {shown}" + (
        f" and {len(names) - 8} more" if names[8:] else ""
    )
