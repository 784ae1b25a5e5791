"""Sparsity tools: the `Thresholds` container and file format, calibration, metrics, the tile
helpers and the concentration losses."""

from condensa.sparsity.calibration import CalibrationConfig, calibrate
from condensa.sparsity.thresholds import Thresholds, load_thresholds

__all__ = ["CalibrationConfig", "Thresholds", "calibrate", "load_thresholds"]
