"""Sparsity tools: the `Thresholds` container and file format, calibration, metrics, tile helpers
and the concentration losses.

Submodules are imported lazily, because `condensa.attention` uses the tile helpers and the model
uses `condensa.attention`, while calibration and metrics use the model.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Thresholds": "condensa.sparsity.thresholds",
    "load_thresholds": "condensa.sparsity.thresholds",
    "calibrate": "condensa.sparsity.calibration",
    "CalibrationConfig": "condensa.sparsity.calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'condensa.sparsity' has no attribute {name!r}")
