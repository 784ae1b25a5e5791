"""`AttentionConfig`: which attention rule each layer runs (DESIGN.md, "Attention semantics").

The config is static and hashable: changing it recompiles, while the thresholds it uses are
arrays passed next to it, so new thresholds do not recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from condensa.errors import ConfigError, did_you_mean
from condensa.kernels.tiling.selectors import DECODE_SELECTORS, SELECTORS

MODES = ("dense", "topk", "toptheta")
PLACEMENTS = ("pre", "post")
SDC_MODES = ("none", "exact", "exp-threshold", "calibrated")
TILE_SELECTORS = ("gate", *SELECTORS)  # the calibrated gate, or a budgeted selector
BACKENDS = ("reference", "pallas")  # `condensa.attention.attend` dispatches on these


def parse_layer_k(value: Any) -> tuple[tuple[int, int], ...]:
    """`"0:512,1:512"`, `{0: 512}` or `[(0, 512)]` -> `((0, 512), (1, 512))`, sorted by layer."""
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            layer, sep, k = item.partition(":")
            if not sep:
                raise ConfigError(f"layer_k item {item!r} must look like LAYER:K, e.g. --layer-k 0:512,1:512.")
            pairs.append((layer, k))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        try:
            pairs = [tuple(p) for p in value]
        except TypeError:
            raise ConfigError(f"layer_k must be 'LAYER:K,...', a mapping or pairs; got {value!r}.") from None
    out = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"layer_k entry {pair!r} must be a (layer, k) pair.")
        try:
            layer, k = int(pair[0]), int(pair[1])
        except (TypeError, ValueError):
            raise ConfigError(f"layer_k entry {pair!r} must hold whole numbers, e.g. 0:512.") from None
        if layer < 0 or k < 1:
            raise ConfigError(f"layer_k entry {layer}:{k} needs a layer >= 0 and k >= 1.")
        out[layer] = k
    return tuple(sorted(out.items()))


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"attention {name} {value!r} is not supported.{did_you_mean(str(value), choices)} "
            f"Choose one of: {', '.join(choices)}."
        )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static choice of attention rule, shared by every layer (except `dense_layers`).

    mode: dense | topk (exact oracle) | toptheta (calibrated thresholds).
    placement: Top-θ compares scaled logits before the softmax ("pre") or probabilities after
      it ("post", no renormalisation). sdc / gamma: softmax-denominator compensation for "pre";
      top-k takes sdc="exact" too (the dropped mass stays in the denominator: the k largest keep
      their softmax probabilities, not renormalised). vmc: V-mean compensation.
    k / layer_k: the target kept elements per row (rows with n <= k stay dense).
    dense_layers: layers that always run dense attention.
    tile_gate with block_q, block_k, tile_budget (f) and sink_tiles: the tile gate in front of the
      element rule (needs calibrated tile thresholds).
    tile_cap: with the gate, keep at most the budget's m_b optional tiles per query tile (or
      decoding row), the best-scored of those above Θ, so f bounds the work. Without it a
      calibrated Θ can keep most tiles of long rows (the first T = 8k run, docs/benchmarks.md).
    decode_gate_rows: with the gate, gate every query row of a full sequence as its decoding step
      would (a single query against Θ_dec, or a decoding selector's budget), in one pass: the
      perplexity decoding would give (reference backend).
    tile_selector: how the gate picks tiles. "gate" is the calibrated threshold on pooled scores
      (Θ from the thresholds file). The others keep exactly the budget's m_b optional tiles per
      query tile, ranked without thresholds (`condensa.kernels.tiling.selectors`): "oracle" (the largest
      true tile mass: the ceiling), "window" (the most recent tiles: the floor), "pooled" (the
      gate's score, uncalibrated), "rowmean", "moment" and "bound" (per-row estimates of the tile
      mass from key-tile statistics), "sampled" (the true tile mass of a few rows per query tile).
      Decoding steps (one query against the cache's tile-mean keys) run "window" and "rowmean"
      with whole tiles (`DECODE_SELECTORS`); the others are prefill only.
    sub_block: for the row selectors, summarise keys in sub-blocks of this many (a divisor of
      block_k; 0 means whole tiles); for "sampled", the rows per query tile (a divisor of block_q;
      0 means 4). Finer is closer to the oracle and costs more.
    shared_heads: with a budgeted selector, the heads of a query tile share one budget of H · m_b
      tiles, given to the (head, tile) pairs with the highest scores.
    """

    mode: str = "dense"  # dense, topk (exact top-k oracle) or toptheta (calibrated thresholds)
    placement: str = "pre"  # Top-θ: pre (threshold scaled logits) or post (threshold probabilities, no renorm)
    sdc: str = "none"  # softmax-denominator compensation: none, exact, exp-threshold or calibrated
    gamma: float = 1.0  # weight of the SDC term: denominator D + gamma * dropped mass
    vmc: bool = False  # V-mean compensation: add the dropped probability mass times the mean visible V row
    k: int = 64  # target kept elements per row (rows with n <= k stay dense); must match the thresholds
    layer_k: Any = ()  # per-layer k overrides as LAYER:K,... (e.g. 0:512,1:512)
    dense_layers: tuple[int, ...] = ()  # layers that always run dense attention
    tile_gate: bool = False  # skip whole key tiles before the element rule (calibrated Θ, or tile_selector)
    block_q: int = 128  # query tile size of the tile gate, in tokens
    block_k: int = 128  # key tile size of the tile gate, in tokens
    tile_budget: float = 0.125  # gate budget f in (0, 1]: m_b = max(1, ceil(f (b + 1))) optional tiles
    sink_tiles: int = 1  # leading key tiles the gate always keeps (besides the diagonal)
    tile_cap: bool = False  # with the gate: keep at most m_b optional tiles per query tile, best above Θ
    decode_gate_rows: bool = False  # with the gate: gate each row as its decoding step would (reference backend)
    tile_selector: str = "gate"  # gate (calibrated Θ), or a budgeted one: oracle, window, pooled, rowmean, ...
    sub_block: int = 0  # row selectors: key sub-block size; sampled: rows per query tile; 0: default
    shared_heads: bool = False  # budgeted selector: a query tile's heads share one budget of H * m_b tiles
    backend: str = "reference"  # reference (jax.numpy) or pallas (fused kernels where they apply)

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("sdc", self.sdc, SDC_MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("tile_selector", self.tile_selector, TILE_SELECTORS)
        object.__setattr__(self, "layer_k", parse_layer_k(self.layer_k))
        object.__setattr__(self, "dense_layers", tuple(sorted({int(x) for x in self.dense_layers})))
        if int(self.k) < 1:
            raise ConfigError(f"attention k must be >= 1; got {self.k}.")
        if not self.gamma >= 0:
            raise ConfigError(f"attention gamma must be >= 0; got {self.gamma}.")
        topk_unnormalised = self.mode == "topk" and self.sdc == "exact"
        if self.sdc != "none" and not topk_unnormalised and (self.mode != "toptheta" or self.placement != "pre"):
            raise ConfigError(
                f"sdc={self.sdc!r} only applies to mode='toptheta' with placement='pre', or as sdc='exact' to "
                f"mode='topk' (got mode={self.mode!r}, placement={self.placement!r}); set sdc='none' or switch to "
                "pre-softmax Top-θ."
            )
        if self.block_q < 1 or self.block_k < 1:
            raise ConfigError(f"tile sizes must be >= 1; got block_q={self.block_q}, block_k={self.block_k}.")
        if not 0 < self.tile_budget <= 1:
            raise ConfigError(f"tile_budget f must be in (0, 1]; got {self.tile_budget}.")
        if self.sink_tiles < 0:
            raise ConfigError(f"sink_tiles must be >= 0; got {self.sink_tiles}.")
        if self.tile_cap and not self.tile_gate:
            raise ConfigError("tile_cap caps the tile gate at its budget, so it needs tile_gate=True.")
        if self.decode_gate_rows and not self.tile_gate:
            raise ConfigError("decode_gate_rows gates rows as decoding does, so it needs tile_gate=True.")
        if self.tile_selector != "gate" and not self.tile_gate:
            raise ConfigError(f"tile_selector={self.tile_selector!r} chooses the tiles of the tile gate, so it needs "
                              "tile_gate=True.")
        if self.shared_heads and self.tile_selector in ("gate", "window"):
            raise ConfigError(f"shared_heads ranks (head, tile) pairs across heads by their scores, which "
                              f"tile_selector={self.tile_selector!r} does not compare across heads; use oracle, pooled "
                              "or a row selector.")
        sub_of = self.block_q if self.tile_selector == "sampled" else self.block_k
        if self.sub_block < 0 or (self.sub_block and sub_of % self.sub_block):
            raise ConfigError(f"sub_block={self.sub_block} must divide {sub_of} (block_q for 'sampled', else "
                              "block_k), or be 0.")
        if self.decode_gate_rows and not self.tile_choice_decodes:
            raise ConfigError(f"decode_gate_rows gates rows as decoding steps, which run the calibrated gate or one of "
                              f"{', '.join(DECODE_SELECTORS)} with whole-tile summaries (sub_block=0); got "
                              f"tile_selector={self.tile_selector!r}, sub_block={self.sub_block}.")

    def k_for(self, layer: int) -> int:
        """k_l: the per-layer override from `layer_k`, else `k`."""
        return dict(self.layer_k).get(int(layer), int(self.k))

    def is_dense_layer(self, layer: int) -> bool:
        return int(layer) in self.dense_layers

    def for_layer(self, layer: int) -> "AttentionConfig":
        """The rule layer `layer` runs, with nothing left that depends on the layer index: plain dense
        attention for a layer in `dense_layers`, else this rule with k = `k_for(layer)`. Per-layer
        decisions read it, so a layer's rule is resolved in one place."""
        if self.is_dense_layer(layer):
            return AttentionConfig(backend=self.backend)
        return self.replace(k=self.k_for(layer), layer_k=(), dense_layers=())

    @property
    def is_dense(self) -> bool:
        """Plain softmax attention: no threshold and no gate."""
        return self.mode == "dense" and not self.tile_gate

    @property
    def needs_thresholds(self) -> bool:
        """Whether `attend` needs a `Thresholds` object for this config (the selectors other than the
        calibrated gate rank tiles without thresholds)."""
        return self.mode == "toptheta" or self.gate_is_calibrated

    @property
    def gate_is_calibrated(self) -> bool:
        return self.tile_gate and self.tile_selector == "gate"

    @property
    def tile_choice_decodes(self) -> bool:
        """Whether a decoding step can run this tile choice: the calibrated gate, or one of
        `DECODE_SELECTORS` on whole-tile summaries (the cache keeps one mean key per tile)."""
        whole_tiles = self.sub_block in (0, self.block_k)
        return self.tile_selector == "gate" or (self.tile_selector in DECODE_SELECTORS and whole_tiles)

    def replace(self, **changes: Any) -> "AttentionConfig":
        return dataclasses.replace(self, **changes)
