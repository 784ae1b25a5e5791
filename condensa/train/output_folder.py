"""The run's output folder: the resolved config it was started with, and refusing to mix runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from condensa.cli import config_to_dict, load_config
from condensa.errors import CondensaError, TrainingError
from condensa.train.config import RESUME_SENSITIVE, TrainConfig

CONFIG_FILE = "config.yaml"


def _get(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values.get(part, {}) if isinstance(values, dict) else None
    return values


def check_compatible(out: Path, cfg: TrainConfig) -> None:
    """Refuses an output folder that holds a run with a config it cannot be resumed under."""
    path = out / CONFIG_FILE
    if not path.is_file():
        return
    try:
        previous = config_to_dict(load_config(TrainConfig, path))
    except CondensaError as err:
        raise TrainingError(f"{out} holds a run whose {CONFIG_FILE} cannot be read ({err}); use another --out.") from None
    current = config_to_dict(cfg)
    changed = [key for key in RESUME_SENSITIVE if _get(previous, key) != _get(current, key)]
    if changed:
        details = "; ".join(f"{k}: {_get(previous, k)!r} -> {_get(current, k)!r}" for k in changed)
        raise TrainingError(
            f"{out} holds a run with an incompatible config ({details}). Resume it with the same settings, "
            "or pass a new --out folder."
        )


def write_config(out: Path, cfg: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    values = config_to_dict(cfg)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(_plain(values), sort_keys=False))


def _plain(value):
    """Tuples as lists, so the YAML reads back with `yaml.safe_load`."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
