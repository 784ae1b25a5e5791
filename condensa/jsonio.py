"""JSON as every file condensa writes spells it: strict JSON, with null where a number is not finite.

Python's `json` writes NaN and Infinity bare, which is not JSON: `jq`, JavaScript's `JSON.parse`
and most other readers refuse such a file. A metric that could not be measured (a tile metric of a
rule without tiles, a loss that diverged) is NaN in memory, so writers here turn every non-finite
float into null. Readers that expect numbers turn null back into NaN: `loads(text, numbers=KEYS)`
does it under the keys named (a null elsewhere can mean "off", as a tile budget of None does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, NumPy / JAX arrays and scalars made
    Python lists and numbers first (so the NaNs inside them are found too), and tuples made lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any, *, default=_default, **kwargs) -> str:
    """Strict JSON text of `value` (keyword arguments as for `json.dumps`); paths become strings."""
    return json.dumps(finite_or_null(value), default=default, allow_nan=False, **kwargs)


def loads(text: str, *, numbers: Collection[str] = ()) -> Any:
    """Parses JSON text; a null under a key in `numbers`, at any depth, becomes NaN. Files written
    before nulls replaced bare NaN still read (Python's parser takes NaN)."""
    if not numbers:
        return json.loads(text)

    def nan(value: Any) -> Any:  # a list of numbers (per-head values) may hold nulls too
        if isinstance(value, list):
            return [nan(v) for v in value]
        return math.nan if value is None else value

    def hook(obj: dict) -> dict:
        return {k: nan(v) if k in numbers else v for k, v in obj.items()}

    return json.loads(text, object_hook=hook)
