"""Starting a training run from a saved bundle: fine-tuning and upcycling.

`--init-from DIR` continues training the bundle in `DIR` on new text: the
model keeps its weights, its vocabulary (words of the new text outside it
are out-of-vocabulary, as in any training) and its context window.
`--upcycle-from DIR` starts an MoE model from the dense bundle in `DIR`
(trained with `--num-experts 1`): every expert is a copy of the dense
feed-forward network, the router is new (`moe.lm.model.upcycle`). Either may
freeze parts of the model (`--freeze experts,router,embeddings,shared`).

The settings that shape the weights come from the bundle's
`training.json` (`MODEL_SETTINGS`; with upcycling, `DENSE_SETTINGS`, the
MoE ones stay the command line's). A flag that sets one of them to a value
other than its default and the bundle's is refused, in one line: the
bundle cannot be continued as another shape. A flag left at its default
takes the bundle's value. The others (learning rate, epochs, dropout,
seed, balancing weight, ...) are the new run's.

Nothing here loads TensorFlow before `load`: `resolve` answers
from the bundle's files.
"""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

from moe.lm.bundle import save_load
from moe.lm.bundle.layout import (
    TRAINING_FILE,
)
from moe.lm.errors import BundleError, ConfigError
from moe.lm.training.config import (
    TrainingConfig,
)

# The parts `--freeze` may freeze, as `TrainingConfig.freeze` names them.
FREEZABLE = ("experts", "router", "embeddings", "shared")
# The settings that shape a model's weights: a continued bundle keeps them.
MODEL_SETTINGS = (
    "architecture", "max_seq_len", "vocab_size", "embed_dim", "num_layers",
    "num_heads", "num_experts", "hidden_dim", "top_k", "routing",
    "capacity_factor", "num_groups", "num_shared_experts",
)  # fmt: skip
# Those an upcycled model takes from its dense bundle (its MoE settings,
# the number of experts and the routing, are the command line's).
DENSE_SETTINGS = (
    "architecture", "max_seq_len", "vocab_size", "embed_dim", "num_layers",
    "num_heads", "hidden_dim", "num_shared_experts",
)  # fmt: skip


class StartingPoint(NamedTuple):
    """A loaded bundle to start from, and how."""

    kind: str  # "init_from" or "upcycle_from"
    directory: str
    bundle: save_load.Bundle
    freeze: tuple[str, ...]


def source(config: TrainingConfig) -> tuple[str, str] | None:
    """`(setting name, folder)` of the bundle to start from, or `None`."""
    if config.init_from is not None and config.upcycle_from is not None:
        raise ConfigError(
            "use `init_from` or `upcycle_from`, not both. Received: "
            f"init_from={config.init_from!r}, "
            f"upcycle_from={config.upcycle_from!r}"
        )
    for name in ("init_from", "upcycle_from"):
        if getattr(config, name) is not None:
            return name, getattr(config, name)
    return None


def frozen_parts(config: TrainingConfig) -> tuple[str, ...]:
    """The parts of `config.freeze`, checked (`FREEZABLE`)."""
    if config.freeze is None:
        return ()
    parts = tuple(p.strip() for p in config.freeze.split(","))
    if not all(p in FREEZABLE for p in parts):
        raise ConfigError(
            "`freeze` takes a comma-separated list of "
            f"{', '.join(FREEZABLE)}. Received: freeze={config.freeze!r}"
        )
    if source(config) is None:
        raise ConfigError(
            "`freeze` needs a trained model to start from (`init_from` or "
            f"`upcycle_from`). Received: freeze={config.freeze!r}"
        )
    return tuple(dict.fromkeys(parts))


def saved_settings(directory: str) -> dict:
    """The settings a bundle was trained with (its `training.json`).

    Raises:
        moe.lm.bundle.layout.BundleError: no usable bundle in `directory`.
    """
    folder = save_load.check_bundle(directory)
    try:
        training = json.loads(
            (folder / TRAINING_FILE).read_text(encoding="utf-8")
        )
        settings = training["config"]
        if not isinstance(settings, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise BundleError(
            f"{directory}/{TRAINING_FILE} does not record the "
            "settings the model was trained with; only a bundle written by "
            "model.py can be continued"
        ) from None
    return settings


def resolve(config: TrainingConfig) -> TrainingConfig:
    """`config` with the model settings of the bundle it starts from.

    Raises:
        ConfigError: a flag contradicts the bundle, or the bundle does not
            fit (`upcycle_from` needs a dense one).
        moe.lm.bundle.layout.BundleError: no usable bundle.
    """
    frozen_parts(config)
    start = source(config)
    if start is None:
        return config
    name, directory = start
    settings = saved_settings(directory)
    names = MODEL_SETTINGS if name == "init_from" else DENSE_SETTINGS
    if name == "upcycle_from":
        _check_dense(config, directory, settings)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    taken = {}
    for setting in names:
        if setting not in settings:
            continue
        value, saved = getattr(config, setting), settings[setting]
        if value != saved and value != defaults[setting]:
            raise ConfigError(
                f"`{setting}` comes from the bundle in `{name}` "
                f"({saved!r}); leave it out. Received: {setting}={value!r}"
            )
        taken[setting] = saved
    resolved = dataclasses.replace(config, **taken)
    if "shared" in frozen_parts(resolved) and not resolved.num_shared_experts:
        raise ConfigError(
            "`freeze` names shared, but the model has no shared experts "
            f"(`num_shared_experts` 0). Received: freeze={config.freeze!r}"
        )
    if "router" in frozen_parts(resolved) and resolved.routing == "hash":
        raise ConfigError(
            "`freeze` names router, but a hash router has no weights. "
            f"Received: freeze={config.freeze!r}"
        )
    return resolved


def _check_dense(config, directory: str, settings: dict) -> None:
    # What `training.json` says, at once; `load` reads the model itself.
    if settings.get("num_experts") != 1:
        _not_dense(directory, settings.get("num_experts"))
    if config.num_experts < 2:
        raise ConfigError(
            "`upcycle_from` makes a Mixture of Experts: `num_experts` must "
            f"be at least 2. Received: num_experts={config.num_experts}"
        )


def _not_dense(directory: str, experts) -> None:
    raise ConfigError(
        f"`upcycle_from` needs a dense bundle (trained with `num_experts` 1); "
        f"{directory} has {experts} experts. Received: "
        f"upcycle_from={directory!r}"
    )


def load(config: TrainingConfig) -> StartingPoint | None:
    """The bundle `config` starts from, loaded (TensorFlow), or `None`.

    Raises:
        ConfigError: its model is quantized, or, to upcycle, not dense
            (read from the model, whatever `training.json` says).
    """
    start = source(config)
    if start is None:
        return None
    name, directory = start
    loaded = save_load.load_bundle(directory)
    _check_model(name, directory, loaded.model)
    return StartingPoint(name, directory, loaded, frozen_parts(config))


def _check_model(name: str, directory: str, model) -> None:
    from moe.lm.model.quantize_model import is_quantized
    from moe.lm.model.routed_layers import experts_of, routed_layers

    if is_quantized(model):
        # Its int8 weights are not trainable, and not the float ones.
        raise ConfigError(
            f"the model in `{name}` ({directory}) is quantized (saved with "
            "`quantize`): it serves but does not train; start from the "
            "float bundle, trained without `quantize`"
        )
    if name == "upcycle_from":
        experts = sorted({experts_of(layer) for layer in routed_layers(model)})
        if experts != [1]:
            _not_dense(directory, "/".join(map(str, experts)))


def start_from(model, start: StartingPoint | None) -> None:
    """Sets `model`'s weights from `start` and freezes its parts.

    Called on a freshly built model, before it is compiled.

    Raises:
        ConfigError: the bundle's model does not fit `model`, or a part to
            freeze has no weights.
    """
    if start is None:
        return
    from moe.lm.model import upcycle

    try:
        upcycle.copy_weights(
            start.bundle.model, model, upcycle=start.kind == "upcycle_from"
        )
    except ValueError as e:
        raise ConfigError(
            f"the model in `{start.kind}` ({start.directory}) does not fit "
            f"its settings: {e}"
        ) from None
    freeze(model, start.freeze)


def freeze(model, parts: tuple[str, ...]) -> None:
    """Makes `parts` (`FREEZABLE` names) of `model` untrainable."""
    for part in parts:
        layers = part_layers(model, part)
        if not any(layer.weights for layer in layers):
            raise ConfigError(
                f"`freeze` names {part}, which this model does not have. "
                f"Received: freeze={','.join(parts)!r}"
            )
        for layer in layers:
            layer.trainable = False


def part_layers(model, part: str) -> list:
    """The layers of `model` that make up `part` (a `FREEZABLE` name)."""
    import keras

    from moe.lm.model.routed_layers import moe_layer_of, routed_layers

    if part == "embeddings":
        return [
            la for la in model.layers
            if isinstance(la, keras.layers.Embedding)
        ]  # fmt: skip
    attribute = {
        "experts": "experts",
        "router": "router",
        "shared": "shared_experts",
    }[part]
    found = [
        getattr(moe_layer_of(layer), attribute)
        for layer in routed_layers(model)
    ]
    return [layer for layer in found if layer is not None]


def describe(start: StartingPoint | None) -> dict | None:
    """What `training.json` records of the starting point."""
    if start is None:
        return None
    return {
        "kind": start.kind,
        "directory": str(Path(start.directory).resolve()),
        "frozen": list(start.freeze),
        "trained_at": start.bundle.training.get("trained_at"),
        "validation": start.bundle.training.get("validation"),
    }
