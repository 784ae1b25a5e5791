"""The study's config: the training runs as `condensa.train` mappings, plus the grids to evaluate and time."""

from __future__ import annotations

import dataclasses
from typing import Any

from condensa.cli import config_from_dict
from condensa.errors import ConfigError
from condensa.train.config import TrainConfig

BASE = "base"  # the pretrained stand-in; every other model is a fine-tune of it


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 32  # corpus training blocks the thresholds are calibrated on
    ks: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])  # k values calibrated and evaluated
    tile_budgets: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.125, 0.0625, 0.03125])  # gate budgets f
    gate_k: int = 64  # gated rules are evaluated at this k only
    tile: int = 128  # block_q = block_k of the gate
    sink_tiles: int = 1  # leading key tiles the gate always keeps
    sigma_add: float = 0.1  # θ = mean + sigma_add * std
    batch_size: int = 2  # blocks per calibration step
    seed: int = 0  # seed of the choice of calibration blocks


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    wikitext: str = "../shared/data/wikitext-2-raw/wiki.test.raw"  # WikiText-2 wiki.test.raw, the second held-out set
    max_tokens: int = 65536  # per held-out set
    batch_size: int = 1  # windows per perplexity forward pass
    metric_blocks: int = 1  # blocks for the element / tile metrics
    models: list[str] = dataclasses.field(default_factory=list)  # empty: every model
    gate_alone: bool = False  # also the gate with dense tiles at every budget (its own perplexity cost)
    decode_gate: bool = False  # also every gated rule with rows gated as decoding steps gate them
    tile_cap: bool = False  # every gate keeps at most its budget of tiles (evaluated and timed alike)
    dense_layers: list[int] = dataclasses.field(default_factory=list)  # layers every rule leaves dense (evaluated and timed alike)


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    models: list[str] = dataclasses.field(default_factory=lambda: [BASE])  # plus the best condensed model
    batch: int = 4  # sequences per prefill / decode call
    k: int = 64  # the Top-θ k timed; must equal calibration.gate_k
    max_delta_ppl: float = 0.01  # the gate budget timed is the smallest whose cost on held-out corpus text is within this
    budget_by: str = "rule"  # "rule": that cost is the gated Top-θ rule's; "gate": the gate alone's (evaluation.gate_alone)
    prefill_grid: bool = False  # also time prefill attention with every Top-θ rule the evaluation measured
    # the grid's compensations: each rule costs ~6 s per layer at T = 8k (compile, reference check, timing)
    grid_compensations: list[str] = dataclasses.field(default_factory=lambda: ["none", "sdc+vmc"])  # none and/or sdc+vmc
    warmup: int = 3  # untimed calls before timing
    repeats: int = 10  # timed calls; the median is reported


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    out: str = "runs/study"  # study folder: models/, thresholds/, results/, report/
    pretrain: dict = dataclasses.field(default_factory=dict)  # a condensa.train config (init: scratch)
    finetune_defaults: dict = dataclasses.field(default_factory=dict)  # shared by every fine-tune
    finetunes: dict = dataclasses.field(default_factory=dict)  # name -> condensa.train overrides
    calibration: CalibrationSettings = CalibrationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    timing: TimingSettings = TimingSettings()

    def __post_init__(self) -> None:
        cal = self.calibration
        if cal.gate_k not in cal.ks:
            raise ConfigError(f"calibration.gate_k={cal.gate_k} must be one of calibration.ks {list(cal.ks)}: gated rules "
                              "are evaluated at that k only, so with another value no gated rule would be measured.")
        if self.timing.budget_by not in ("rule", "gate"):
            raise ConfigError(f"timing.budget_by must be 'rule' or 'gate'; got {self.timing.budget_by!r}.")
        if self.timing.budget_by == "gate" and not self.evaluation.gate_alone:
            raise ConfigError("timing.budget_by: gate chooses the budget by the gate's own perplexity cost; set "
                              "evaluation.gate_alone: true so that the evaluation measures it.")
        unknown = [c for c in self.timing.grid_compensations if c not in ("none", "sdc+vmc")]
        if unknown:
            raise ConfigError(f"timing.grid_compensations takes 'none' and/or 'sdc+vmc'; got {unknown}.")
        if self.timing.k != cal.gate_k:
            raise ConfigError(f"timing.k={self.timing.k} must equal calibration.gate_k={cal.gate_k}: the timed gate "
                              "budget is chosen from the gated rules measured at that k.")

    def model_names(self) -> list[str]:
        return [BASE, *self.finetunes]

    def train_config(self, name: str) -> TrainConfig:
        """The `condensa.train` config of one model: the pretraining run, or a fine-tune of its export."""
        if name == BASE:
            values = _merge(self.pretrain, {"out": f"{self.out}/models/{BASE}"})
        elif name in self.finetunes:
            values = _merge(_merge(_data_only(self.pretrain), self.finetune_defaults), self.finetunes[name] or {})
            values = _merge(values, {"out": f"{self.out}/models/{name}", "init": "pretrained",
                                     "model": f"{self.out}/models/{BASE}/hf"})
        else:
            raise ConfigError(f"no model {name!r} in this study; its models are {', '.join(self.model_names())}.")
        return config_from_dict(TrainConfig, values, prefix=f"{name}.")


def _data_only(pretrain: dict) -> dict:
    """A fine-tune reads the pretraining data (same split, so held-out text stays held out)."""
    return {"data": dict(pretrain.get("data", {}))}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_models(config: StudyConfig, names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in config.model_names()]
    if unknown:
        raise ConfigError(f"unknown study model(s) {', '.join(unknown)}; the study has {', '.join(config.model_names())}.")
    return names


def as_dict(config: StudyConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
