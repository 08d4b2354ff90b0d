"""The errors a user can cause, each a `UserError`.

Bad flags, a bad corpus, a missing or broken bundle, a strategy or export
that cannot run here, a training that diverged, a query the model cannot
answer: the command lines (`model.py`, `serve.py`) catch `UserError` and
print its message as one line on stderr, with a non-zero exit; any other
exception is a bug and shows its traceback. The classes keep the base a
caller may already catch (`ValueError`, `RuntimeError`). Each module
imports the ones it raises.
"""


class UserError(Exception):
    """An error the user can fix; the message says what to do next."""


class ConfigError(UserError, ValueError):
    """An invalid setting; the message names the flag."""


class CorpusError(UserError, ValueError):
    """A corpus the user gave cannot be used; the message says why."""


class BundleError(UserError, ValueError):
    """The bundle is missing, corrupt or inconsistent, or may not be written."""


class BundleBusyError(BundleError):
    """Another process holds the lock on the bundle folder."""


class ModelOutputError(BundleError):
    """The model produced NaN or infinite probabilities: it cannot serve."""


class StrategyError(UserError, ValueError):
    """A strategy that cannot run here (bad `TF_CONFIG`, wrong backend)."""


class TrainingError(UserError, RuntimeError):
    """Training failed in a way the user can act on (diverged, memory)."""


class ExportError(UserError, ValueError):
    """The export cannot be written (wrong backend, target not empty)."""


class QueryError(UserError, ValueError):
    """A query the model cannot answer (no words, a limit out of range)."""
