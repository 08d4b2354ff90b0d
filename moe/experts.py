import contextlib
import math
import re
import warnings

import keras
from keras import ops

from moe import activations, quantization, validation
from moe.initializers import PerExpertInitializer, base_seed
from moe.layer_experts import LayerExperts

# The weights of one expert, in the order `expert_fn` takes them (the
# biases only with `use_bias`, the gate only with `gated`).
_PARTS = ("in_kernel", "in_bias", "gate_kernel", "gate_bias", "out_kernel")
_PARTS += ("out_bias",)
# A stack of experts with more numbers than this warns before it is
# created: 2**31 numbers are 8 GiB in float32 (16 GiB more for Adam's two
# moments), beyond most single accelerators and many hosts, and more than
# int32 indices address. The warning is what a user sees before the
# backend's out-of-memory error or the kernel's OOM killer. A warning, not
# an error: sharded over devices (`moe.distribution`) or on a large host
# such a layer is legitimate, and what fits is the backend's to say.
LARGE_WEIGHTS = 2**31


@keras.saving.register_keras_serializable(package="moe")
class Experts(keras.layers.Layer):
    """A stack of feed-forward experts, weights stacked experts axis first.

    Expert `e` maps `x` to `act(x @ W_in[e] + b_in[e]) @ W_out[e] + b_out[e]`,
    or, with `gated=True` (GLU; SwiGLU with `activation="silu"`),
    `(act(x @ W_gate[e] + b_gate[e]) * (x @ W_in[e] + b_in[e])) @ W_out[e]
    + b_out[e]`. GPT-OSS's clamped SwiGLU is the gated form with
    `activation="quick_gelu"`, `glu_limit=7.0` (the gate clipped from above,
    the linear half to `[-7, 7]`, before the product) and
    `glu_linear_offset=1.0` (added to the linear half). Each matrix is one
    variable for all experts:
    `<prefix>_in_kernel` `(num_experts, d, hidden_dim)`,
    `<prefix>_gate_kernel` `(num_experts, d, hidden_dim)`,
    `<prefix>_out_kernel` `(num_experts, hidden_dim, output_dim)`, and the
    biases `(num_experts, hidden_dim)` / `(num_experts, output_dim)`. That
    layout is what batched expert matmuls and expert parallelism shard on.

    `MoELayer` holds two: its routed experts (`weight_prefix="expert"`) and
    its shared experts (`weight_prefix="shared_expert"`, with their own
    width). Called directly, the layer runs every expert on every input;
    `MoELayer` instead hands it to `moe.dispatch.run_experts`, which reads
    `stacked_weights` and `expert_fn` and runs each expert only on the
    inputs routed to it.

    `enable_lora(rank)` gives each expert a low-rank adapter per kernel
    (the kernels frozen, every dispatch layout reading the sum);
    `merge_lora()` writes them back.

    Args:
        num_experts: int >= 1.
        hidden_dim: int >= 1, the hidden width of each expert.
        output_dim: int or `None` (the input width).
        activation: a Keras activation or `"quick_gelu"`
            (`moe.activations`); with `gated`, the gate's. Defaults to
            `"relu"`.
        gated: bool, GLU-style experts. Defaults to `False`.
        glu_limit: float > 0 or `None`, gated experts only: clip the gate
            to at most `glu_limit` and the linear half to `[-glu_limit,
            glu_limit]` before the activation (GPT-OSS's `swiglu_limit`).
            Defaults to `None` (no clipping).
        glu_linear_offset: float, gated experts only: added to the linear
            half (after clipping), `act(gate) * (linear + offset)`; GPT-OSS
            uses 1. Defaults to `0.0`.
        use_bias: bool. Defaults to `True`.
        kernel_initializer: drawn for each expert on its own (the fans
            of one expert's matrix, and a seed of its own, so experts start
            different whether or not the initializer is seeded). Defaults
            to `"glorot_uniform"`.
        bias_initializer: per expert, likewise. Defaults to `"zeros"`.
        seed: int or `None`, the seed the experts' initial weights derive
            from when the initializers carry none (`None`: drawn from
            Python's `random`, which `keras.utils.set_random_seed` seeds).
        weight_prefix: the start of the variable names. Defaults to
            `"expert"`.
        **kwargs: base layer arguments.

    Call arguments:
        inputs: `(..., d)`.

    Returns:
        `(num_experts, ..., output_dim)`: every expert's output.

    Example:

    >>> experts = Experts(num_experts=4, hidden_dim=8, gated=True)
    >>> tuple(experts(keras.ops.ones((3, 6))).shape)
    (4, 3, 6)
    >>> tuple(experts.expert_in_kernel.shape)
    (4, 6, 8)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        output_dim=None,
        activation="relu",
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        weight_prefix="expert",
        seed=None,
        glu_limit=None,
        glu_linear_offset=0.0,
        **kwargs,
    ):
        validation.integer("num_experts", num_experts)
        validation.integer("hidden_dim", hidden_dim)
        if output_dim is not None:
            validation.integer("output_dim", output_dim)
        validation.boolean("gated", gated)
        validation.boolean("use_bias", use_bias)
        validate_glu(gated, glu_limit, glu_linear_offset)
        if seed is not None:
            validation.integer("seed", seed, minimum=0)
        if not isinstance(weight_prefix, str) or not weight_prefix:
            raise ValueError(
                "`weight_prefix` must be a non-empty string. Received: "
                f"weight_prefix={weight_prefix!r}"
            )
        # Saved with a quantized layer (`moe.quantization`), as Dense does.
        quantization_config = kwargs.pop("quantization_config", None)
        super().__init__(**kwargs)
        self.quantization_config = keras.saving.deserialize_keras_object(
            quantization_config
        )
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.activation = activations.get(activation)
        self.gated = gated
        self.glu_limit = glu_limit
        self.glu_linear_offset = glu_linear_offset
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.weight_prefix = weight_prefix
        self.seed = seed
        # Set by `MoELayer` when it loaded these weights from a file written
        # before the experts were a sublayer (they were its own variables).
        self._loaded_by_parent = False
        # Set by `enable_lora` (not constructor arguments: a saved file
        # holds the merged kernels and loads without adapters).
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last dimension of the inputs of `Experts` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        output_dim = self.output_dim or input_dim
        h = self.hidden_dim
        shapes = {
            "in_kernel": (input_dim, h),
            "gate_kernel": (input_dim, h),
            "out_kernel": (h, output_dim),
            "in_bias": (h,),
            "gate_bias": (h,),
            "out_bias": (output_dim,),
        }
        # One base seed per initializer, drawn once per build: every weight
        # and expert derives its own seed from it (`moe.initializers`).
        seeds = {
            "kernel": base_seed(self.kernel_initializer, self.seed),
            "bias": base_seed(self.bias_initializer, self.seed),
        }
        # Kernels first, then biases: the order of the variables (and of a
        # saved file's entries) is that of the earlier `MoELayer`.
        int8 = self.quantization_mode == "int8"  # reloading a quantized one
        warn_if_large(
            self,
            [(self.num_experts,) + shapes[p] for p in self._parts()],
            "int8" if int8 else self.variable_dtype,
        )
        if int8:
            self.inputs_quantizer = quantization.inputs_quantizer(
                self.quantization_config
            )
        for part in self._parts(kernels_first=True):
            shape = shapes[part]
            name = f"{self.weight_prefix}_{part}"
            if int8 and part.endswith("kernel"):
                quantization.add_int8_kernel(self, name, shape)
                continue
            kind = "kernel" if part.endswith("kernel") else "bias"
            initializer = PerExpertInitializer(
                getattr(self, f"{kind}_initializer"), seeds[kind], stream=name
            )
            variable = self.add_weight(
                name=name,
                shape=(self.num_experts,) + shape,
                initializer=initializer,
            )
            setattr(self, name, variable)
        if int8:
            self._is_quantized = True

    def _parts(self, kernels_first=False):
        parts = [
            p
            for p in _PARTS
            if (self.use_bias or not p.endswith("bias"))
            and (self.gated or not p.startswith("gate"))
        ]
        if kernels_first:
            parts.sort(key=lambda p: p.endswith("bias"))
        return parts

    def variable_names(self, kernels_first=False):
        """The variable names; when quantized, each kernel followed by its
        scales."""
        names = []
        for part in self._parts(kernels_first):
            names.append(f"{self.weight_prefix}_{part}")
            if self.quantization_mode and part.endswith("kernel"):
                names.append(f"{self.weight_prefix}_{part}_scale")
        return names

    @property
    def stacked_weights(self):
        """The stacked variables, experts axis first, in `expert_fn`'s
        order (when quantized, each kernel followed by its scales); with
        LoRA, each kernel plus its adapters' product (`enable_lora`)."""
        return [
            self._lora_kernel(name) if name in self._lora_names else
            getattr(self, name)
            for name in self.variable_names()
        ]  # fmt: skip

    @property
    def _lora_names(self):
        # {kernel name: (A name, B name)}: "expert_in_kernel" has the
        # adapters "expert_in_lora_a" and "expert_in_lora_b".
        if not self.lora_enabled:
            return {}
        return {
            f"{self.weight_prefix}_{part}": tuple(
                f"{self.weight_prefix}_{part[: -len('kernel')]}lora_{ab}"
                for ab in "ab"
            )
            for part in self._parts()
            if part.endswith("kernel")
        }

    def _lora_kernel(self, name):
        # kernel + (alpha / rank) * A @ B, one product per expert:
        # (E, d_in, r) @ (E, r, d_out) -> (E, d_in, d_out).
        a_name, b_name = self._lora_names[name]
        delta = ops.matmul(getattr(self, a_name), getattr(self, b_name))
        return ops.add(
            getattr(self, name), (self.lora_alpha / self.lora_rank) * delta
        )

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Adds a low-rank adapter to each expert's kernels and freezes them.

        As `keras.layers.Dense.enable_lora`, for every expert: each stacked
        kernel `(num_experts, d_in, d_out)` gets `<prefix>_<part>_lora_a`
        `(num_experts, d_in, rank)` and `<prefix>_<part>_lora_b`
        `(num_experts, rank, d_out)` (float32), and every dispatch layout
        reads `kernel + (lora_alpha / rank) * lora_a @ lora_b` per expert.
        The kernels stop being trainable (the biases stay trainable, as
        Dense's does); B starts at zero, so the outputs are unchanged until
        training moves it. Saving writes the merged kernels (the file
        loads as plain experts); `merge_lora()` merges in place.

        Args:
            rank: int >= 1, the adapters' rank.
            lora_alpha: float > 0 or `None` (`rank`); the adapters'
                product is scaled by `lora_alpha / rank`.
            a_initializer: drawn per expert, as the kernels are. Defaults
                to `"he_uniform"`.
            b_initializer: Defaults to `"zeros"`.
        """
        validation.integer("rank", rank)
        if lora_alpha is not None:
            validation.number(
                "lora_alpha", lora_alpha, minimum=0, min_open=True
            )
        if not self.built:
            raise ValueError(
                "LoRA adapts built experts: build or call the layer first. "
                f"Received: built=False for {self.name!r}"
            )
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on {self.name!r}; call "
                "`merge_lora()` first to start again. Received: "
                f"rank={rank} with lora_rank={self.lora_rank}"
            )
        if self.quantization_mode:
            raise ValueError(
                f"LoRA adapts float kernels, and {self.name!r} is quantized; "
                "enable LoRA before quantizing. Received: "
                f"quantization_mode={self.quantization_mode!r}"
            )
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = rank if lora_alpha is None else lora_alpha
        a_initializer = keras.initializers.get(a_initializer)
        b_initializer = keras.initializers.get(b_initializer)
        seed = base_seed(a_initializer, self.seed)
        self._tracker.unlock()
        # Under the kernels' own scope, so that the adapters' paths are
        # `.../experts/expert_in_lora_a` (as `moe.distribution` matches).
        with contextlib.ExitStack() as scopes:
            for scope in (self.path or "").split("/")[:-1]:
                scopes.enter_context(keras.name_scope(scope))
            for name, (a_name, b_name) in self._lora_names.items():
                kernel = getattr(self, name)
                _, d_in, d_out = kernel.shape
                for ab_name, shape, initializer in (
                    (a_name, (d_in, rank), a_initializer),
                    (b_name, (rank, d_out), b_initializer),
                ):
                    variable = self.add_weight(
                        name=ab_name,
                        shape=(self.num_experts,) + shape,
                        initializer=PerExpertInitializer(
                            initializer, seed, stream=ab_name
                        ),
                        dtype="float32",
                    )
                    setattr(self, ab_name, variable)
                kernel.trainable = False
        self._tracker.lock()

    def merge_lora(self):
        """Writes the adapters into the kernels and drops them; the kernels
        are trainable again. The outputs are unchanged (to float
        rounding)."""
        if not self.lora_enabled:
            raise ValueError(
                f"{self.name!r} has no LoRA adapters to merge; "
                "`enable_lora(rank)` adds them. Received: lora_enabled=False"
            )
        names = self._lora_names
        for name, adapters in names.items():
            kernel = getattr(self, name)
            kernel.assign(ops.cast(self._lora_kernel(name), kernel.dtype))
            kernel.trainable = True
            for adapter in adapters:
                delattr(self, adapter)
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def expert_fn(self, x, *params, affine=None):
        """Experts on `x` `(..., n, d)` with params stacked on the same
        leading axes (or one expert's params for `(n, d)`).

        `affine(x, kernel, bias)` computes each `x @ kernel + bias` (`bias`
        may be `None`); a dispatch layout may pass its own, e.g. a grouped
        matmul applying expert `e`'s kernel to expert `e`'s rows.
        """
        params = list(params)

        def linear(x):
            # The next kernel (and scales, when quantized) and bias.
            kernel = params.pop(0)
            scale = params.pop(0) if self.quantization_mode else None
            bias = params.pop(0) if self.use_bias else None
            if scale is None:
                return (affine or _affine)(x, kernel, bias)
            if affine is None:
                return quantization.int8_affine(
                    x, kernel, scale, bias, self.inputs_quantizer, x.dtype
                )
            # A layout's own matmul takes float kernels.
            kernel = quantization.dequantize(kernel, scale, x.dtype)
            return affine(x, kernel, bias)

        hidden = linear(x)  # the linear half, when gated
        if self.gated:
            gate = linear(x)
            if self.glu_limit is not None:
                gate = ops.minimum(gate, self.glu_limit)
                hidden = ops.clip(hidden, -self.glu_limit, self.glu_limit)
            if self.glu_linear_offset:
                hidden = hidden + self.glu_linear_offset
            hidden = self.activation(gate) * hidden
        else:
            hidden = self.activation(hidden)
        return linear(hidden)

    def call(self, inputs):
        x = ops.reshape(inputs, (1, -1, ops.shape(inputs)[-1]))
        y = self.expert_fn(x, *self.stacked_weights)  # (E, n, d_out)
        return ops.reshape(
            y,
            (self.num_experts,)
            + tuple(ops.shape(inputs)[:-1])
            + (ops.shape(y)[-1],),
        )

    def _int8_call(self, inputs):
        # `expert_fn` reads the quantization mode itself.
        return self.call(inputs)

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the stacked kernels in place to int8, per expert and
        output channel; the biases stay float (`moe.quantization`)."""
        if self.lora_enabled:
            raise ValueError(
                f"{self.name!r} has LoRA adapters: call `merge_lora()` "
                f"before quantizing. Received: mode={mode!r}"
            )
        quantization.quantize_experts(self, mode, config)

    def save_own_variables(self, store):
        # By name: a quantized layer's variables were not all created in
        # `build`, so their tracking order differs from a rebuilt one's.
        # With LoRA, each kernel merged with its adapters (as Dense does):
        # the file holds plain experts.
        if not self.built:
            return
        for i, name in enumerate(self.variable_names(kernels_first=True)):
            if name in self._lora_names:
                kernel = getattr(self, name)
                store[str(i)] = ops.cast(self._lora_kernel(name), kernel.dtype)
            else:
                store[str(i)] = getattr(self, name)

    def load_own_variables(self, store):
        if self._loaded_by_parent and not len(store.keys()):
            return
        if not self.lora_enabled:
            self._check_load_own_variables(store)
        if not self.built:
            return
        for i, name in enumerate(self.variable_names(kernels_first=True)):
            getattr(self, name).assign(store[str(i)])
        # The file's kernels are merged: the adapters start again from a
        # zero product (B), keeping A.
        for _, b_name in self._lora_names.values():
            b = getattr(self, b_name)
            b.assign(ops.zeros(b.shape, b.dtype))

    def compute_output_shape(self, input_shape):
        output_dim = self.output_dim or input_shape[-1]
        return (self.num_experts,) + tuple(input_shape[:-1]) + (output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim,
                "activation": activations.serialize(self.activation),
                "gated": self.gated,
                "glu_limit": self.glu_limit,
                "glu_linear_offset": self.glu_linear_offset,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "weight_prefix": self.weight_prefix,
                "seed": self.seed,
            }
        )
        if self.quantization_mode:
            ser = keras.saving.serialize_keras_object
            config["quantization_config"] = ser(self.quantization_config)
        return config


def validate_glu(gated, glu_limit, glu_linear_offset):
    """`glu_limit` (> 0 or `None`) and `glu_linear_offset` shape the GLU of
    gated experts only."""
    if glu_limit is not None:
        validation.number("glu_limit", glu_limit, minimum=0, min_open=True)
    validation.number("glu_linear_offset", glu_linear_offset)
    if not gated and (glu_limit is not None or glu_linear_offset):
        raise ValueError(
            "`glu_limit` and `glu_linear_offset` shape the GLU of gated "
            "experts: they need `gated=True`. Received: "
            f"glu_limit={glu_limit}, glu_linear_offset={glu_linear_offset}, "
            "gated=False"
        )


def warn_if_large(layer, shapes, dtype):
    """Warn before creating weights of `shapes` holding more than
    `LARGE_WEIGHTS` numbers, stating their count and size at `dtype`."""
    count = sum(math.prod(shape) for shape in shapes)
    if count <= LARGE_WEIGHTS:
        return
    bits = re.search(r"\d+", dtype)
    size = count * (int(bits.group()) if bits else 8) // 8
    warnings.warn(
        f"The stacked experts {layer.name!r} are about to create "
        f"{count:,} parameters ({_bytes_text(size)} in {dtype}), more than "
        f"{LARGE_WEIGHTS:,}: building may run out of memory (a backend "
        "out-of-memory error, or the process killed). Check `num_experts` "
        f"and `hidden_dim`. Received: shapes {shapes}",
        stacklevel=2,
    )


def _bytes_text(size):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.1f} {unit}" if unit != "bytes" else f"{size} B"
        size /= 1024


def _affine(x, kernel, bias):
    y = ops.matmul(x, kernel)
    if bias is not None:
        y = y + ops.expand_dims(bias, -2)
    return y


def make_experts(
    num_experts,
    hidden_dim,
    output_dim,
    activation,
    gated,
    use_bias,
    kernel_initializer,
    bias_initializer,
    num_shared_experts,
    shared_expert_hidden_dim,
    shared_expert_gate,
    experts,
    seed=None,
    glu_limit=None,
    glu_linear_offset=0.0,
    dtype=None,
):
    """The routed and shared experts of an `MoELayer`, from its arguments.

    Returns:
        `(routed, shared)`: an `Experts` (or a `LayerExperts` over
        `experts`), and the shared `Experts` or `None`.
    """
    common = dict(
        output_dim=output_dim,
        activation=activation,
        gated=gated,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer,
        seed=seed,
        glu_limit=glu_limit,
        glu_linear_offset=glu_linear_offset,
        dtype=dtype,
    )
    if experts is None:
        routed = Experts(num_experts, hidden_dim, name="experts", **common)
    else:
        routed = LayerExperts(experts, name="experts", dtype=dtype)
        if num_experts not in (None, routed.num_experts):
            raise ValueError(
                "With `experts`, `num_experts` is their number "
                f"({routed.num_experts}). Received: num_experts={num_experts}"
            )
    validation.integer("num_shared_experts", num_shared_experts, minimum=0)
    validation.boolean("shared_expert_gate", shared_expert_gate)
    if not num_shared_experts:
        if shared_expert_gate:
            raise ValueError(
                "`shared_expert_gate` gates the shared experts: it needs "
                "`num_shared_experts` >= 1. Received: shared_expert_gate="
                f"{shared_expert_gate}, num_shared_experts=0"
            )
        return routed, None
    if shared_expert_hidden_dim is not None:
        validation.integer("shared_expert_hidden_dim", shared_expert_hidden_dim)
    shared = Experts(
        num_shared_experts,
        shared_expert_hidden_dim or hidden_dim,
        weight_prefix="shared_expert",
        name="shared_experts",
        **common,
    )
    return routed, shared


def check_output_width(routed, shared, input_shape, output_dim):
    """The routed and shared experts output `output_dim` features (or
    agree, when it is unset); built experts only."""
    widths = [
        part.compute_output_shape(input_shape)[-1]
        for part in (routed, shared)
        if part is not None
    ]
    if len({*widths, output_dim or widths[0]}) > 1:
        raise ValueError(
            "The routed and shared experts must output `output_dim` "
            f"features. Received: output widths {widths}, "
            f"output_dim={output_dim}"
        )
