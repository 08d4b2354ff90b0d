"""From the settings as given to the settings a run uses.

`validate` checks a `TrainingConfig` as the user gave it, with the model
settings of the bundle it starts from (`--init-from`, `--upcycle-from`),
before TensorFlow loads; `resolve` is the config a run then trains with.
"""

from moe.lm.training import finetune
from moe.lm.training.config import TrainingConfig, check, with_defaults


def validate(config: TrainingConfig) -> None:
    """Checks every setting of `config`, and the output and log folders.

    Raises:
        moe.lm.training.config.ConfigError: the first invalid setting,
            naming its flag, or a flag the starting bundle contradicts.
        moe.lm.bundle.layout.BundleError: no usable bundle to start from;
            `output` may not be written, or another run is writing it.
    """
    check(finetune.resolve(config))


def resolve(config: TrainingConfig) -> TrainingConfig:
    """`config` with the starting bundle's model settings and the
    architecture's defaults for whatever is left unset."""
    return with_defaults(finetune.resolve(config))
