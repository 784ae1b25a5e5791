"""docs/metrics.md against the files the tools write: every key a tool writes must be in its table.

The tools' tests pass the JSON they read back to `undocumented`; a key added to the code without a
row in the table fails them. Placeholders such as `top{k}_mass` stand for a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
# values that are not made of result keys: a map of names to files, or a config documented in docs/cli.md
OPAQUE = {"thresholds", "plots", "attention"}


def documented() -> list[re.Pattern]:
    """One pattern per key named (in backticks) in the first column of the table."""
    patterns = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split(" | ")[0]
        for name in re.findall(r"`([^`]+)`", first):
            patterns.append(re.compile(re.escape(name).replace(r"\{k\}", r"\d+") + r"\Z"))
    return patterns


def keys_of(value: Any) -> set[str]:
    """Every mapping key inside `value` (a parsed JSON document), at any depth."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            found.add(key)
            if key not in OPAQUE:
                found |= keys_of(inner)
    elif isinstance(value, list):
        for inner in value:
            found |= keys_of(inner)
    return found


def undocumented(*documents: Any) -> list[str]:
    """The keys of `documents` that docs/metrics.md does not list, sorted (empty when all are)."""
    patterns = documented()
    keys = set().union(*(keys_of(d) for d in documents))
    return sorted(k for k in keys if not any(p.match(k) for p in patterns))
