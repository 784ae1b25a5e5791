"""User-facing errors.

Every mistake a user can make (a wrong path, a bad config, a file for another model) raises a
subclass of `CondensaError` whose message says what was wrong *and what to do*. The CLIs print
that one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CondensaError(Exception):
    """Base class for every error caused by user input rather than by a bug."""


class ConfigError(CondensaError):
    """An unknown, unsupported or inconsistent configuration value."""


class CheckpointError(CondensaError):
    """A weights file or training checkpoint that is missing, truncated, corrupt or mismatched."""


class ModelInputError(CondensaError):
    """Token ids or shapes the model cannot take (out of vocabulary, longer than n_positions)."""


class DataError(CondensaError):
    """A dataset or text source that is missing or empty."""


class HubUnavailableError(CondensaError):
    """A Hugging Face hub id was given but the hub cannot be reached."""


class ThresholdsError(CondensaError):
    """A thresholds file that does not fit the model or the attention config."""


class TrainingError(CondensaError):
    """A training run that cannot go on (NaN loss, incompatible output folder)."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """A ' Did you mean X?' suffix for unknown-name messages, or '' when nothing is close.

    Names are matched without `prefix` (a shared section such as 'optimizer.' would make every key
    look close), and the suggestion carries it, so the user can paste the key as it is spelled on
    the command line."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {prefix + close[0]!r}?" if close else ""
