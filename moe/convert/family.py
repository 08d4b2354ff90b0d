"""How one model family's MoE block maps onto `MoELayer`: the description
every family module fills in."""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Where a block keeps its routed experts.

    `per_expert` are the names of expert `e`'s `(gate, up, down)` linear
    weights in the one-matrix-per-expert layout (`gate` is `None` for
    experts without a gate projection), or `None` where checkpoints have
    no such layout; `fused` says whether the block also comes as
    transformers 5's `experts.gate_up_proj` / `experts.down_proj`. Those
    are `(E, out, in)` with the gate's half first, except where
    `in_out` (`(E, in, out)`) and `interleaved` (gate and up alternate
    along the fused axis) say otherwise (GPT-OSS); with `biases`, each comes
    with a `<name>_bias`.
    """

    per_expert: tuple | None
    fused: bool = True
    in_out: bool = False
    interleaved: bool = False
    biases: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how its config and weights map onto `MoELayer`.

    `arguments(config)` gives the `MoELayer` arguments; the other fields name
    the block's weights: the router's `(E, d)` matrix, its bias `(E,)`
    (read when the arguments set `router_use_bias`), the selection bias
    `(E,)`, the experts, the always-on shared MLP (the prefix of its
    `gate_proj` / `up_proj` / `down_proj`) and its sigmoid gate `(1, d)`.
    """

    arguments: Callable[[dict], dict]
    router: str = "gate.weight"
    router_bias: str | None = None
    experts: ExpertNames = ExpertNames(
        (
            "experts.{e}.gate_proj",
            "experts.{e}.up_proj",
            "experts.{e}.down_proj",
        )
    )
    selection_bias: str | None = None
    shared_experts: str | None = None
    shared_expert_gate: str | None = None
