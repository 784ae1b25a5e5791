"""The training run's config: nested dataclasses read from YAML plus `--section.key value` overrides.

Top-level keys follow the issue's command line: `--model gpt2` (hub id or directory) or
`--init scratch --model-config tiny`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from condensa.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "../shared/data/corpus"  # a text file, a folder of .txt files, or an HF dataset name[:config]
    tokenizer: str = "../shared/data/gpt2-tokenizer"  # a directory, or a hub id
    seq_len: int = 256  # tokens per training sequence (at most the model's n_positions)
    validation_fraction: float = 0.02  # share of the packed blocks held out for validation (the stream's tail)
    split: str = "train"  # HF datasets only
    text_field: str = "text"  # HF datasets only
    cache_dir: str = "~/.cache/condensa/tokens"  # tokenized text is cached here, keyed by text and tokenizer ($CONDENSA_CACHE_DIR moves ~/.cache/condensa)
    vocab_limit: int | None = None  # keep only the N most frequent tokens (tiny CPU models; see data.compact_vocabulary)
    # Used instead of `source` / `tokenizer` when those are local paths that do not exist (so one
    # config serves a checkout with ../shared/data beside it and a machine with the HF cache).
    fallback_source: str | None = None  # used when source is a local path that does not exist (e.g. an HF dataset)
    fallback_tokenizer: str | None = None  # used when tokenizer is a local path that does not exist (e.g. a hub id)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate (AdamW), reached after warmup; cosine-decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # optimizer steps of linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only (not biases or LayerNorm)
    b1: float = 0.9  # AdamW first-moment decay rate
    b2: float = 0.95  # AdamW second-moment decay rate
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class TopkLoss:
    weight: float = 0.0  # λ; 0 turns the loss off
    k: int = 8  # the loss is the attention mass outside each row's k largest probabilities
    layers: tuple[int, ...] = ()  # empty: all layers
    warmup_steps: int = 0  # λ ramps linearly from 0 over these steps


@dataclasses.dataclass(frozen=True)
class TileLoss:
    weight: float = 0.0  # λ of the mass outside the oracle's tiles (diagonal, sinks, best m_b); 0 turns it off
    f: float = 0.125  # tile budget: m_b = max(1, ceil(f (b + 1))) optional tiles per query tile
    layers: tuple[int, ...] = ()  # empty: all layers
    warmup_steps: int = 0  # λ ramps linearly from 0 over these steps


@dataclasses.dataclass(frozen=True)
class GateLoss:
    weight: float = 0.0  # λ of the cross-entropy: softmax of pooled gate scores vs tile masses; 0 turns it off
    tau: float = 1.0  # temperature of the softmax over gate scores
    layers: tuple[int, ...] = ()  # empty: all layers
    warmup_steps: int = 0  # λ ramps linearly from 0 over these steps


@dataclasses.dataclass(frozen=True)
class SelectLoss:
    """The mass outside the tiles a budgeted selector keeps (`condensa.sparsity.selector_loss`)."""
    weight: float = 0.0  # λ of the mass outside the tiles the selector keeps; 0 turns it off
    f: float = 0.25  # the selector's tile budget, as `--attention.tile_budget` at evaluation
    selector: str = "rowmean"  # one the kernels' pre-pass runs: rowmean or window
    shared_heads: bool = True  # one budget for the heads of a query tile (`--attention.shared_heads`)
    layers: tuple[int, ...] = ()  # empty: all layers
    warmup_steps: int = 0  # λ ramps linearly from 0 over these steps


@dataclasses.dataclass(frozen=True)
class LossConfig:
    topk: TopkLoss = TopkLoss()
    tile: TileLoss = TileLoss()
    gate: GateLoss = GateLoss()
    select: SelectLoss = SelectLoss()
    tile_size: int = 64  # b_q = b_k for the tile and gate losses and metrics
    sink_tiles: int = 1  # leading key tiles always kept (with the diagonal) by the tile/gate losses and metrics
    # How the losses get what they need: "reference" takes the probabilities from the model (its
    # reference attention op); "pallas" recomputes the masses from q and k in a fused kernel while
    # attention keeps its fused path (condensa.kernels.attention_masses); "auto" is pallas on a
    # single GPU where it applies (dense attention; padded length <= 2048 for topk, <= 64 tiles for
    # tile/gate) and reference elsewhere (CPU, several devices).
    kernel: Literal["auto", "pallas", "reference"] = "auto"  # auto, pallas (fused kernel from q, k) or reference

    @property
    def active(self) -> bool:
        return any(x.weight > 0 for x in (self.topk, self.tile, self.gate, self.select))


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 1000  # optimizer steps in all (the learning-rate schedule spans them)
    batch_size: int = 8  # global batch (all devices), per optimizer micro-step
    seed: int = 0  # seed of scratch initialisation, dropout and the batch shuffle
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    remat: bool = True  # recompute each block's activations in the backward pass (less memory, more compute)
    deterministic: bool = False  # bit-identical reruns of one seed on GPUs (XLA attention, no cuDNN; slower)
    eval_every: int = 200  # steps between validation evaluations (and at the last step)
    eval_batches: int = 8  # 0 turns evaluation off
    # top-k / tile masses in evaluation: they hold every layer's [H, T, T] probabilities of one
    # sequence (38 GB at T = 16k for a 6-layer, 6-head model); false keeps the validation loss alone
    eval_attention_metrics: bool = True  # top-k / tile mass metrics at evaluation (costly at long T); false: loss only
    log_every: int = 10  # steps between lines in metrics.jsonl and the progress bar
    export: bool = True  # write an HF directory (out/hf) at the end


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (and at the last step)
    keep: int = 3  # newest checkpoints kept; older ones are deleted
    async_save: bool = True  # write checkpoints in the background while training goes on


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 0  # devices on the data axis; 0 = all devices
    fsdp: bool = False  # shard parameters and optimizer state over the data axis instead of replicating


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"  # run folder: config.yaml, checkpoints/, metrics.jsonl, hf/; a run already there resumes
    model: str = "gpt2"  # for init=pretrained: HF directory, .gguf file, named model (smollm2-135m) or hub id
    init: Literal["pretrained", "scratch"] = "pretrained"  # pretrained (load model) or scratch (random model_config)
    model_config: str = "tiny"  # preset for init=scratch (tiny, gpt2-small, ...)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # GPT2Config fields, e.g. n_positions
    dropout: float | None = None  # overrides all GPT-2 dropout rates when set
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self) -> None:
        positive = {
            "data.seq_len": self.data.seq_len, "train.steps": self.train.steps,
            "train.batch_size": self.train.batch_size, "optimizer.grad_accum": self.optimizer.grad_accum,
            "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep,
            "train.eval_every": self.train.eval_every, "train.log_every": self.train.log_every,
            "loss.tile_size": self.loss.tile_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {value}.")
        if self.optimizer.lr < 0 or self.optimizer.weight_decay < 0:
            raise ConfigError(f"optimizer.lr and optimizer.weight_decay cannot be negative; got lr {self.optimizer.lr}, "
                              f"weight_decay {self.optimizer.weight_decay}.")
        if self.loss.topk.k < 1:
            raise ConfigError(f"loss.topk.k must be at least 1; got {self.loss.topk.k}.")
        for name, f in (("loss.tile.f", self.loss.tile.f), ("loss.select.f", self.loss.select.f)):
            if not 0 < f <= 1:
                raise ConfigError(f"{name} is a fraction of tiles in (0, 1]; got {f}.")
        if self.loss.select.selector not in SELECT_LOSS_SELECTORS:
            raise ConfigError(f"loss.select.selector must be one the kernels' pre-pass runs: "
                              f"{', '.join(SELECT_LOSS_SELECTORS)}; got {self.loss.select.selector!r}.")


SELECT_LOSS_SELECTORS = ("rowmean", "window")  # the budgeted selectors of the fused prefill pre-pass

# Sections whose change makes an existing run's checkpoints meaningless to resume.
RESUME_SENSITIVE = (
    "model", "init", "model_config", "model_overrides", "data.source", "data.tokenizer", "data.seq_len",
    "data.validation_fraction", "data.vocab_limit", "data.split", "data.text_field", "train.batch_size",
    "train.seed", "optimizer.grad_accum",
)
