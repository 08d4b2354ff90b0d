"""From the settings as given to the settings a run uses.

`resolve` checks a `TrainingConfig` as the user gave it, with the model
settings of the bundle it starts from (`--init-from`, `--upcycle-from`,
read once), before TensorFlow loads, and returns the config the run trains
with: the bundle's model settings taken, the architecture's defaults filled
in. `validate` is the same check for a caller that only asks.
"""

from moe.lm.training import finetune
from moe.lm.training.config import TrainingConfig, check, with_defaults


def resolve(config: TrainingConfig) -> TrainingConfig:
    """`config`, checked, with the starting bundle's model settings and the
    architecture's defaults for whatever is left unset.

    Raises:
        moe.lm.errors.ConfigError: the first invalid setting, naming its
            flag, or a flag the starting bundle contradicts.
        moe.lm.errors.BundleError: no usable bundle to start from; `output`
            may not be written, or another run is writing it.
    """
    taken = finetune.resolve(config)
    check(taken)
    return with_defaults(taken)


def validate(config: TrainingConfig) -> None:
    """Checks every setting of `config`, and the output and log folders
    (raises as `resolve` does)."""
    resolve(config)
