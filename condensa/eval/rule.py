"""The attention rule an evaluation command runs: its --attention keys merged with a thresholds file."""

from __future__ import annotations

import dataclasses

from condensa.cli import given_keys
from condensa.sparsity import Thresholds


def with_thresholds(cfg, model_config):
    """(cfg, thresholds): with a thresholds file (checked against the model first), the attention
    keys left unset (mode, placement, k, the tile gate and its geometry) come from the file, and a
    key set to a value the file cannot serve is refused (`Thresholds.resolve`); cfg.attention is then
    the rule that runs, as config.json records it. Without a file: (cfg, None). Shared by ppl and
    generate."""
    if not cfg.thresholds:
        return cfg, None
    thresholds = Thresholds.load(cfg.thresholds).validate(model_config, source=cfg.thresholds)
    attention = thresholds.resolve(cfg.attention, given_keys(cfg, "attention"), source=cfg.thresholds)
    return dataclasses.replace(cfg, attention=attention), thresholds
