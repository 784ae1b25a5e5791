"""The shipped run configs parse, and the CLI's dotted overrides reach the nested sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from condensa.cli import load_config
from condensa.errors import ConfigError
from condensa.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quickstart_trains_a_tiny_model_from_scratch_on_the_corpus():
    cfg = load_config(TrainConfig, CONFIGS / "quickstart.yaml", ["--optimizer.lr", "3e-4", "--loss.topk.layers", "0,1"])
    assert cfg.init == "scratch" and cfg.model_config == "tiny"
    assert cfg.data.source.endswith("shared/data/corpus/gutenberg") and cfg.data.fallback_source == "wikitext:wikitext-2-raw-v1"
    assert cfg.optimizer.lr == 3e-4 and cfg.loss.topk.layers == (0, 1) and cfg.loss.topk.weight > 0


def test_gpt2_wikitext_fine_tunes_the_hub_model():
    cfg = load_config(TrainConfig, CONFIGS / "gpt2-wikitext.yaml")
    assert cfg.init == "pretrained" and cfg.model == "gpt2"
    assert cfg.data.source == "wikitext:wikitext-2-raw-v1" and cfg.data.seq_len == 1024


@pytest.mark.parametrize("override, message", [
    (["--data.seq_len", "0"], "data.seq_len must be a positive integer"),
    (["--loss.tile.f", "2"], "loss.tile.f"),
    (["--train.dtype", "float16"], "train.dtype"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, CONFIGS / "quickstart.yaml", override)
