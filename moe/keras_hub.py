"""keras-hub's MoE models, sparse: `sparsify(model)` and the way back.

keras-hub's MoE blocks run every expert on every token (one einsum over all
`E` experts, then a mask). `sparsify` replaces each of them, in place, by a
block holding an `moe.MoELayer` with the same weights, so that a token meets
only its `k` experts' weights; `unsparsify` writes the (possibly fine-tuned)
weights back into keras-hub's own blocks, so that `save_to_preset` and
`from_preset` work without this library. `docs/keras_hub.md` shows the few
lines a user writes.

Each keras-hub block class maps onto `MoELayer` through one `_Family`: the
Hugging Face `model_type` whose `moe.convert` arguments give the routing
(the same maths: softmax top-k, renormalised or not, shared experts), and a
table pairing each keras-hub variable with the `MoELayer` variable(s) it
becomes, read both ways.

Requires keras-hub (`pip install "moe[keras-hub]"`); `import moe` never
imports it. Import this module before `keras.saving.load_model` reads a
sparsified model, so that its classes are registered.
"""

import contextlib
import dataclasses
import importlib
import inspect

import keras
import numpy as np
from keras import ops

from moe import validation
from moe.convert import FAMILIES as CONVERT_FAMILIES
from moe.convert.weights import join_gate_up, split_gate_up
from moe.moe_layer import MoELayer

try:
    import keras_hub  # noqa: F401
except ImportError as error:  # pragma: no cover - the extra is installed
    raise ImportError(
        "`moe.keras_hub` needs keras-hub: pip install 'moe[keras-hub]'"
    ) from error

__all__ = [
    "sparsify",
    "unsparsify",
    "sparse_blocks",
    "merge_lora",
    "expert_usage",
    "SparseMoEBlock",
]


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one keras-hub MoE block class maps onto `MoELayer`.

    `block` is the class's import path, `backbone` the name of the
    keras-hub backbone that holds it; `hf_config(block)` the Hugging Face
    config whose `moe.convert` arguments describe the block's routing;
    `weights` pairs each keras-hub variable (an attribute path from the
    block) with the `MoELayer` variables it holds: one path (the same
    array), a gate/up pair (`Experts`' gate and in weights, which keras-hub
    fuses on the last axis: in halves, or `interleaved`), or one with `[0]`
    (a shared expert: one expert of a stack). `mask` says what the decoder
    passes as `attention_mask`: `"padding"` (`(batch, seq)`), `"attention"`
    (the `(batch, seq, seq)` self-attention mask, whose diagonal is the
    padding mask) or `None`. `renamed` maps the block's constructor arguments
    that it keeps under another attribute name (`{argument: attribute}`).
    """

    block: str
    backbone: str
    hf_config: object
    weights: tuple
    mask: str | None
    renamed: dict = dataclasses.field(default_factory=dict)


def _top_k_config(model_type, block, **extra):
    experts = block.expert_bank
    return {
        "model_type": model_type,
        "hidden_size": block.hidden_dim,
        "num_local_experts": block.num_experts,
        "num_experts_per_tok": block.top_k,
        "hidden_act": keras.activations.serialize(
            getattr(experts, "activation", keras.activations.silu)
        ),
        **extra,
    }


_ROUTER = (
    "_sparse_feedforward_gate_dense.kernel",
    "gating_network.router_kernel",
)
_EXPERT_GATE = "experts.expert_gate_kernel"
_EXPERT_IN = "experts.expert_in_kernel"
_EXPERT_OUT = "experts.expert_out_kernel"
_FUSED_EXPERTS = (
    (
        "expert_bank._expert_feedforward_gate_dense",
        (_EXPERT_GATE, _EXPERT_IN, "halves"),
    ),
    ("expert_bank._expert_feedforward_output_dense", _EXPERT_OUT),
)


def _shared_mlp(block_prefix, gate_dense):
    """A keras-hub gated MLP (`_feedforward_{gate,intermediate,output}_
    dense`) as `MoELayer`'s one shared expert, and its sigmoid gate."""
    return (
        (f"{block_prefix}._feedforward_gate_dense.kernel",
         "shared_experts.shared_expert_gate_kernel[0]"),
        (f"{block_prefix}._feedforward_intermediate_dense.kernel",
         "shared_experts.shared_expert_in_kernel[0]"),
        (f"{block_prefix}._feedforward_output_dense.kernel",
         "shared_experts.shared_expert_out_kernel[0]"),
        (f"{gate_dense}.kernel", "shared_gate_kernel"),
    )  # fmt: skip


_MODELS = "keras_hub.src.models"
FAMILIES = {
    "mixtral": _Family(
        block=f"{_MODELS}.mixtral.mixtral_decoder.MixtralSparseMoeBlock",
        backbone="MixtralBackbone",
        hf_config=lambda b: _top_k_config(
            "mixtral",
            b,
            intermediate_size=b.intermediate_dim,
            router_aux_loss_coef=b.router_aux_loss_coef,
        ),
        weights=(
            _ROUTER,
            ("expert_bank._expert_feedforward_gate_dense", _EXPERT_GATE),
            ("expert_bank._expert_feedforward_intermediate_dense", _EXPERT_IN),
            ("expert_bank._expert_feedforward_output_dense", _EXPERT_OUT),
        ),
        mask="padding",
    ),
    "qwen3_moe": _Family(
        block=f"{_MODELS}.qwen3_moe.qwen3_moe_decoder.Qwen3SparseMoeBlock",
        backbone="Qwen3MoeBackbone",
        hf_config=lambda b: _top_k_config(
            "qwen3_moe",
            b,
            moe_intermediate_size=b.intermediate_dim,
            norm_topk_prob=b.norm_top_k_prob,
            router_aux_loss_coef=b.router_aux_loss_coefficient,
        ),
        weights=(_ROUTER, *_FUSED_EXPERTS),
        mask="attention",
        renamed={"moe_intermediate_dim": "intermediate_dim"},
    ),
    "qwen_moe": _Family(
        block=f"{_MODELS}.qwen_moe.qwen_moe_decoder.QwenSparseMoeBlock",
        backbone="QwenMoeBackbone",
        hf_config=lambda b: _top_k_config(
            "qwen2_moe",
            b,
            moe_intermediate_size=b.intermediate_dim,
            shared_expert_intermediate_size=b.intermediate_dim_shared,
            norm_topk_prob=b.norm_top_k_prob,
            router_aux_loss_coef=b.router_aux_loss_coefficient,
        ),
        weights=(
            _ROUTER,
            *_FUSED_EXPERTS,
            *_shared_mlp("shared_expert_dense", "shared_expert_gate_dense"),
        ),
        mask="attention",
        renamed={
            "moe_intermediate_dim": "intermediate_dim",
            "shared_expert_intermediate_dim": "intermediate_dim_shared",
        },
    ),
    "gpt_oss": _Family(
        block=f"{_MODELS}.gpt_oss.gpt_oss_decoder.GptOssSparseMoeBlock",
        backbone="GptOssBackbone",
        hf_config=lambda b: {
            "model_type": "gpt_oss",
            "hidden_size": b.hidden_dim,
            "intermediate_size": b.intermediate_dim,
            "num_local_experts": b.num_experts,
            "num_experts_per_tok": b.top_k,
            "swiglu_limit": b.experts.limit,
            "swiglu_alpha": b.experts.alpha,
            # keras-hub's GPT-OSS block adds no balancing loss.
            "router_aux_loss_coef": 0.0,
        },
        weights=(
            ("router.router_dense.kernel", "gating_network.router_kernel"),
            ("router.router_dense.bias", "gating_network.router_bias"),
            (
                "experts.gate_up_proj",
                (_EXPERT_GATE, _EXPERT_IN, "interleaved"),
            ),
            (
                "experts.gate_up_proj_bias",
                (
                    "experts.expert_gate_bias",
                    "experts.expert_in_bias",
                    "interleaved",
                ),
            ),
            ("experts.down_proj", _EXPERT_OUT),
            ("experts.down_proj_bias", "experts.expert_out_bias"),
        ),
        mask=None,
    ),
    "qwen3_5_moe": _Family(
        block=(
            f"{_MODELS}.qwen3_5_moe.qwen3_5_moe_decoder."
            "Qwen3_5MoeSparseMoeBlock"
        ),
        backbone="Qwen3_5MoeBackbone",
        hf_config=lambda b: _top_k_config(
            "qwen3_5_moe_text",
            b,
            moe_intermediate_size=b.moe_intermediate_dim,
            shared_expert_intermediate_size=b.shared_expert_intermediate_size,
            norm_topk_prob=True,
            router_aux_loss_coef=b.router_aux_loss_coefficient,
        ),
        weights=(
            ("_router_gate.kernel", "gating_network.router_kernel"),
            *_FUSED_EXPERTS,
            *_shared_mlp("shared_expert", "_shared_expert_gate"),
        ),
        mask="padding",
    ),
}


def _block_class(family):
    module, name = family.block.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # not in this keras-hub version
        return None


# --- Reading and writing the paired variables ---------------------------------


def _variable(owner, path):
    """`(variable, index or None)` at an attribute path like
    `"experts.expert_in_kernel[0]"`."""
    index = None
    if path.endswith("]"):
        path, index = path[:-1].split("[")
        index = int(index)
    value = owner
    for name in path.split("."):
        value = getattr(value, name)
    return value, index


def _read(owner, path):
    variable, index = _variable(owner, path)
    value = ops.convert_to_numpy(variable)
    return value if index is None else value[index]


def _write(owner, path, value):
    variable, index = _variable(owner, path)
    if index is not None:
        whole = ops.convert_to_numpy(variable)
        whole[index] = value
        value = whole
    variable.assign(np.asarray(value, dtype=variable.dtype))


def _copy_into_moe(block, moe_layer, family):
    for block_path, moe_paths in family.weights:
        value = _read(block, block_path)
        if isinstance(moe_paths, str):
            _write(moe_layer, moe_paths, value)
            continue
        gate_path, up_path, fused = moe_paths
        gate, up = split_gate_up(value, interleaved=fused == "interleaved")
        _write(moe_layer, gate_path, gate)
        _write(moe_layer, up_path, up)


def _copy_into_block(moe_layer, block, family):
    for block_path, moe_paths in family.weights:
        if isinstance(moe_paths, str):
            value = _read(moe_layer, moe_paths)
        else:
            gate_path, up_path, fused = moe_paths
            value = join_gate_up(
                _read(moe_layer, gate_path),
                _read(moe_layer, up_path),
                interleaved=fused == "interleaved",
            )
        _write(block, block_path, value)


# --- The block ---------------------------------------------------------------


class SparseMoEBlock(keras.layers.Layer):
    """A keras-hub MoE block computed by an `moe.MoELayer`.

    Called like the block it replaces (`(hidden_states, attention_mask=None,
    training=None)`), it returns `(outputs, router_logits)` as keras-hub's
    blocks do; the router logits are computed only when the decoder asks
    for them (`return_router_logits`, from its `output_router_logits`),
    else `None`. In training, the padding the decoder passes as
    `attention_mask` is excluded from routing and from the load-balancing
    loss (keras-hub's Qwen blocks count padded positions); at inference
    every position is computed, as keras-hub does.

    Each keras-hub block class gets a subclass of both this class and
    itself (`Sparse<BlockClass>`, registered with Keras), so that decoders
    that check `isinstance(self.mlp, <BlockClass>)` call it as before.

    Args:
        moe_layer: the `MoELayer` (or its serialized config).
        family: the `FAMILIES` key of the block it replaces.
        dense_config: that block's `get_config()`, to rebuild it
            (`unsparsify`).
        return_router_logits: bool. Defaults to `False`.
    """

    def __init__(
        self,
        moe_layer,
        family,
        dense_config,
        return_router_logits=False,
        **kwargs,
    ):
        # Not the keras-hub block's `__init__` (a second base of the
        # subclasses): that one takes its own arguments.
        keras.layers.Layer.__init__(self, **kwargs)
        if isinstance(moe_layer, dict):
            moe_layer = keras.saving.deserialize_keras_object(moe_layer)
        self.moe = moe_layer
        self.family = family
        self.dense_config = dense_config
        self.return_router_logits = return_router_logits
        # A callable while `expert_usage` records where the inputs go (not
        # a list: Keras would track a copy).
        self._route_recorder = None

    def build(self, input_shape):
        if not self.moe.built:
            self.moe.build((None, input_shape[-1]))

    def call(self, hidden_states, attention_mask=None, training=None):
        mask = None
        if training and attention_mask is not None:
            mask = _padding_mask(attention_mask, FAMILIES[self.family].mask)
        outputs = self.moe(hidden_states, mask=mask, training=training)
        logits = None
        if self.return_router_logits:
            tokens = ops.reshape(hidden_states, (-1, hidden_states.shape[-1]))
            logits = self.moe.gating_network(tokens)
        if self._route_recorder is not None:  # `expert_usage`, eager
            self._route_recorder(self.moe.route(hidden_states))
        return outputs, logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), None

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update(
            moe_layer=keras.saving.serialize_keras_object(self.moe),
            family=self.family,
            dense_config=self.dense_config,
            return_router_logits=self.return_router_logits,
        )
        return config


def _padding_mask(attention_mask, kind):
    if kind == "padding":
        return ops.cast(attention_mask, "bool")
    if kind == "attention" and len(attention_mask.shape) == 3:
        # A position attends to itself exactly when it is not padding.
        return ops.cast(ops.diagonal(attention_mask, 0, 1, 2), "bool")
    return None


def _register(name, bases):
    cls = type(name, bases, {"__module__": __name__})
    return keras.saving.register_keras_serializable(package="moe")(cls)


# Block class -> its sparse subclass; family key by block class.
_SPARSE_BLOCKS = {}
_FAMILY_OF = {}
for _key, _family in FAMILIES.items():
    _cls = _block_class(_family)
    if _cls is not None:
        _FAMILY_OF[_cls] = _key
        _SPARSE_BLOCKS[_cls] = _register(
            f"Sparse{_cls.__name__}", (SparseMoEBlock, _cls)
        )


# --- Whole models ------------------------------------------------------------


class _SparseModel:
    """Mixed into a sparsified model's class (`Sparse<ModelClass>`): its
    config records the sparse blocks, so that `.keras` files reload them.

    Keras saves a model as its constructor's config plus weights by layer
    path; a keras-hub backbone's config rebuilds keras-hub's own blocks, so
    the sparse ones are recorded beside it and swapped in again on load,
    before the weights are read.
    """

    def get_config(self):
        config = super().get_config()
        config["sparse_moe_blocks"] = {
            f"{owner.name}/{attribute}": keras.saving.serialize_keras_object(
                block
            )
            for owner, attribute, block in sparse_blocks(self)
        }
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        blocks = config.pop("sparse_moe_blocks", {})
        model = super().from_config(config)
        owners = {layer.name: layer for layer in model._flatten_layers()}
        for where, block_config in blocks.items():
            name, attribute = where.split("/")
            owner = owners[name]
            block = keras.saving.deserialize_keras_object(block_config)
            _build_in_place(block, owner, getattr(owner, attribute).hidden_dim)
            _swap(owner, attribute, block)
        return model


_SPARSE_MODELS = {}


def _sparse_model_class(cls):
    if issubclass(cls, _SparseModel):
        return cls
    if cls not in _SPARSE_MODELS:
        _SPARSE_MODELS[cls] = _register(
            f"Sparse{cls.__name__}", (_SparseModel, cls)
        )
    return _SPARSE_MODELS[cls]


def _constructor_config(block, family):
    """The arguments that rebuild `block`, serialized.

    keras-hub's MoE blocks define no `get_config` (and Keras's automatic
    one refuses their dtype-policy argument), but keep each constructor
    argument as an attribute (`family.renamed` lists the exceptions).
    """
    parameters = inspect.signature(type(block).__init__).parameters
    config = {
        name: getattr(block, family.renamed.get(name, name))
        for name, p in parameters.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    config.update(dtype=block.dtype_policy, name=block.name)
    return {
        name: keras.saving.serialize_keras_object(value)
        for name, value in config.items()
    }


def _swap(owner, attribute, layer):
    """Sets `owner.<attribute> = layer` on a built layer.

    Keras locks a built layer's tracked state (no new sublayers after
    `build`); keras-hub decoders keep their MoE block as a plain attribute,
    so swapping it needs the tracker unlocked for the assignment, and the
    old block untracked (`delattr` would not), so that its variables leave
    the model.
    """
    tracker = owner._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        tracker.untrack(getattr(owner, attribute))
        setattr(owner, attribute, layer)
    finally:
        if locked:
            tracker.lock()


# The traced functions Keras and keras-hub keep on a model: traced with the
# old blocks, they would go on running them.
_TRACED_FUNCTIONS = (
    "train_function",
    "test_function",
    "predict_function",
    "generate_function",
)


def _forget_traced_functions(model):
    for layer in [model, *model._flatten_layers(include_self=False)]:
        for name in _TRACED_FUNCTIONS:
            if getattr(layer, name, None) is not None:
                setattr(layer, name, None)


def _build_in_place(block, owner, hidden_dim):
    """Builds `block` under `owner`'s name scope, so that its variables'
    paths are those of a block built by `owner` (`transformer_layer_0/
    <block>/...`), as `keras.distribution` layouts match them."""
    with keras.name_scope(owner.path or owner.name):
        block.build((None, None, hidden_dim))


def _blocks_of(model, classes):
    """`(owner, attribute, block)` for each block of `classes` held as an
    attribute of a layer of `model`."""
    found = []
    for owner in [model, *model._flatten_layers(include_self=False)]:
        for attribute, value in list(vars(owner).items()):
            if isinstance(value, classes) and value is not owner:
                found.append((owner, attribute, value))
    return found


def sparse_blocks(model):
    """The sparse blocks of a sparsified model: `(owner, attribute,
    SparseMoEBlock)` triples."""
    return _blocks_of(model, SparseMoEBlock)


def sparsify(model, **moe_arguments):
    """Replaces each keras-hub MoE block of `model` by a `SparseMoEBlock`.

    Works on a keras-hub backbone, a causal LM (through its backbone), or
    any Keras model holding keras-hub MoE blocks; the model is changed in
    place and returned. Outputs are unchanged (float32: to float
    rounding); each token now runs through its `k` experts only.

    Args:
        model: a built Keras model.
        **moe_arguments: further `MoELayer` arguments for every block
            (`dispatch`, `capacity_factor`, `telemetry`, ...).

    Returns:
        `model`.

    Raises:
        ValueError: when `model` holds no keras-hub MoE block this module
            knows (the message lists the known ones).
    """
    found = [
        (owner, attribute, block)
        for owner, attribute, block in _blocks_of(model, tuple(_FAMILY_OF))
        if not isinstance(block, SparseMoEBlock)
    ]
    if not found and not sparse_blocks(model):
        known = ", ".join(cls.__name__ for cls in _FAMILY_OF)
        raise ValueError(
            "`sparsify` replaces keras-hub's MoE blocks "
            f"({known}); the model holds none. Received: "
            f"{type(model).__name__} named {model.name!r}"
        )
    for owner, attribute, block in found:
        key = _FAMILY_OF[type(block)]
        family = FAMILIES[key]
        hf_config = family.hf_config(block)
        convert_family = CONVERT_FAMILIES[hf_config["model_type"]]
        moe_layer = MoELayer(
            **convert_family.arguments(hf_config),
            dtype=block.dtype_policy,
            name="moe",
            **moe_arguments,
        )
        sparse = _SPARSE_BLOCKS[type(block)](
            moe_layer,
            family=key,
            dense_config=_constructor_config(block, family),
            return_router_logits=bool(
                getattr(owner, "output_router_logits", False)
            ),
            dtype=block.dtype_policy,
            name=block.name,
        )
        _build_in_place(sparse, owner, block.hidden_dim)
        _copy_into_moe(block, moe_layer, family)
        _swap(owner, attribute, sparse)
    for layer in [model, *model._flatten_layers(include_self=False)]:
        if isinstance(layer, keras_hub.models.Backbone) and sparse_blocks(
            layer
        ):
            layer.__class__ = _sparse_model_class(type(layer))
    _forget_traced_functions(model)
    return model


def unsparsify(model):
    """The way back: keras-hub's own blocks holding the sparse blocks'
    current weights (e.g. after fine-tuning), in place; returns `model`.

    The result is a plain keras-hub model (`save_to_preset` and
    `from_preset` work without this library). Quantized `MoELayer`s must
    be brought back to float weights first, and LoRA adapters merged
    (`merge_lora`).
    """
    blocks = sparse_blocks(model)
    adapted = [s.name for _, _, s in blocks if _has_lora(s.moe)]
    if adapted:
        raise ValueError(
            "keras-hub's blocks hold plain kernels: call "
            "`moe.keras_hub.merge_lora(model)` first. Received: LoRA "
            f"adapters in {adapted}"
        )
    for owner, attribute, sparse in blocks:
        family = FAMILIES[sparse.family]
        cls = next(c for c, k in _FAMILY_OF.items() if k == sparse.family)
        block = cls.from_config(sparse.dense_config)
        _build_in_place(block, owner, block.hidden_dim)
        _copy_into_block(sparse.moe, block, family)
        _swap(owner, attribute, block)
    for layer in [model, *model._flatten_layers(include_self=False)]:
        if isinstance(layer, _SparseModel):
            layer.__class__ = next(
                base
                for base in type(layer).__mro__
                if not issubclass(base, _SparseModel)
            )
    _forget_traced_functions(model)
    return model


def _has_lora(moe_layer):
    return any(
        getattr(part, "lora_enabled", False)
        for part in (moe_layer.experts, moe_layer.shared_experts)
    )


def merge_lora(model):
    """Writes the LoRA adapters of every sparse block's experts into their
    kernels and drops them (`moe.MoELayer.merge_lora`), in place; returns
    `model`. The outputs are unchanged (to float rounding).

    Raises:
        ValueError: no sparse block holds adapters.
    """
    adapted = [s.moe for _, _, s in sparse_blocks(model) if _has_lora(s.moe)]
    if not adapted:
        raise ValueError(
            "No sparse block of the model holds LoRA adapters to merge "
            "(`backbone.enable_lora(rank, target_layer_names=['experts'])` "
            f"adds them). Received: {type(model).__name__} named "
            f"{model.name!r}"
        )
    for moe_layer in adapted:
        moe_layer.merge_lora()
    _forget_traced_functions(model)
    return model


# --- Expert usage over a text -------------------------------------------------


def expert_usage(model, texts, tokenizer=None, top_tokens=10):
    """Where the tokens of `texts` go: each expert's load and the tokens it
    takes most, per sparse block.

    Each text is tokenized as the causal LM's preprocessor does (its start
    token first when it adds one), run once through the backbone, and each
    sparse block's inputs are routed by its `MoELayer.route` (the router's
    own inference decision); every kept (token, expert) pair is counted.

    Args:
        model: a sparsified keras-hub causal LM, or a backbone (then pass
            `tokenizer`).
        texts: a string or a list of strings.
        tokenizer: a keras-hub tokenizer. Defaults to the causal LM's
            preprocessor's.
        top_tokens: int >= 1, the tokens listed per expert. Defaults to 10.

    Returns:
        `{block: [{"expert", "tokens_taken", "load", "top_tokens": [[token,
        count, share], ...]}, ...]}`, one list per sparse block, named by
        the layer that holds it (`"transformer_layer_0"`); `load` is the
        expert's share of the block's (token, expert) pairs (the loads of
        a block sum to 1), `top_tokens` the decoded tokens it took most
        (ties: lower id first), each with its count and share of the
        expert's tokens.

    Raises:
        ValueError: no tokenizer, a model without sparse blocks, or texts
            that hold no token.
    """
    validation.integer("top_tokens", top_tokens)
    texts = [texts] if isinstance(texts, str) else list(texts)
    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = tokenizer or getattr(preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "`expert_usage` tokenizes the texts: pass `tokenizer=` (the "
            "model has no preprocessor). Received: tokenizer=None"
        )
    backbone = getattr(model, "backbone", model)
    blocks = sparse_blocks(backbone)
    if not blocks:
        raise ValueError(
            "`expert_usage` reads the routing of sparse blocks: call "
            "`moe.keras_hub.sparsify(model)` first. Received: "
            f"{type(model).__name__} named {model.name!r}"
        )
    start = None
    if getattr(preprocessor, "add_start_token", False):
        start = getattr(tokenizer, "start_token_id", None)
    pairs = {owner.name: [] for owner, _, _ in blocks}  # (expert, token)
    for text in texts:
        ids = np.asarray(ops.convert_to_numpy(tokenizer(text)), "int32")
        ids = ids.reshape(-1)
        if start is not None:
            ids = np.concatenate([[start], ids]).astype("int32")
        if not len(ids):
            continue
        x = {"token_ids": ids[None], "padding_mask": np.ones_like(ids)[None]}
        with _recording_routes(blocks) as routes:
            backbone(x, training=False)
        for name, (route,) in routes.items():
            kept = ops.convert_to_numpy(route["kept"])  # (1, n, k)
            experts = ops.convert_to_numpy(route["expert_indices"])[kept]
            tokens = np.broadcast_to(ids[None, :, None], kept.shape)[kept]
            pairs[name].append(np.stack([experts, tokens], axis=1))
    if not any(pairs.values()):
        raise ValueError(
            f"The texts hold no token to route. Received: {len(texts)} texts"
        )
    return {
        owner.name: _usage_summary(
            np.concatenate(pairs[owner.name]),
            block.moe.num_experts,
            tokenizer,
            top_tokens,
        )
        for owner, _, block in blocks
    }


@contextlib.contextmanager
def _recording_routes(blocks):
    """`{owner name: [route]}`: what each block's `MoELayer.route` says of
    its inputs while the model runs (eagerly) inside the context."""
    routes = {}
    try:
        for owner, _, block in blocks:
            block._route_recorder = routes.setdefault(owner.name, []).append
        yield routes
    finally:
        for _, _, block in blocks:
            block._route_recorder = None


def _usage_summary(pairs, num_experts, tokenizer, top_tokens):
    # pairs: (P, 2) int, each kept (expert, token id) pair.
    summary = []
    for expert in range(num_experts):
        tokens = pairs[pairs[:, 0] == expert, 1]
        ids, counts = np.unique(tokens, return_counts=True)  # ids ascending
        best = np.argsort(-counts, kind="stable")[:top_tokens]
        summary.append(
            {
                "expert": expert,
                "tokens_taken": len(tokens),
                "load": len(tokens) / len(pairs),
                "top_tokens": [
                    [
                        _decode(tokenizer, ids[i]),
                        int(counts[i]),
                        float(counts[i] / len(tokens)),
                    ]
                    for i in best
                ],
            }
        )
    return summary


def _decode(tokenizer, token_id):
    text = tokenizer.detokenize([int(token_id)])
    text = ops.convert_to_numpy(text) if not isinstance(text, str) else text
    if isinstance(text, np.ndarray):
        text = text.item()
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return str(text)


def _register_known_models():
    # The sparse subclasses of keras-hub's MoE backbones, registered now so
    # that `keras.saving.load_model` finds them.
    for family in FAMILIES.values():
        cls = getattr(keras_hub.models, family.backbone, None)
        if cls is not None:
            _sparse_model_class(cls)


_register_known_models()
