"""Reading Hugging Face config.json, shared by `GPT2Config`, `LlamaConfig` and the family registry.

Both config classes are frozen dataclasses whose field names are HF's, so a config.json maps one
to one: keep the fields the class knows, drop the keys HF writes that say nothing about the
network, and refuse anything else by name (a misspelt field must not fall back to its default
silently). The registry parses the file before it knows which class reads it, so the parsing,
with its errors that say what to do, is a function of its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Self

from condensa.errors import CheckpointError, ConfigError, did_you_mean


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; a `CheckpointError` when it is missing, not JSON, or not an object."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; a model directory needs a config.json.") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-export the model.") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-export the model.")
    return values


class HFConfig:
    """Mixin of the HF-named config dataclasses; a subclass defines `from_dict`."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def network_fields(cls, values: dict[str, Any], *, bookkeeping: set[str], source: str,
                       family: str) -> dict[str, Any]:
        """The entries of `values` that are fields of `cls`. Keys in `bookkeeping` or starting with
        `_` are dropped; any other key is a `ConfigError` naming it and the closest field."""
        known = set(cls.field_names())
        kwargs = {}
        for key, value in values.items():
            if key in known:
                kwargs[key] = value
            elif key not in bookkeeping and not key.startswith("_"):
                raise ConfigError(
                    f"{source}: unknown {family} config field {key!r}.{did_you_mean(key, known)} "
                    f"Known fields: {', '.join(sorted(known))}."
                )
        return kwargs

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Self:
        raise NotImplementedError

    @classmethod
    def from_json_file(cls, path: str | Path) -> Self:
        return cls.from_dict(read_config_json(path), source=str(path))

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)
