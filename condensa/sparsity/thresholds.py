"""`Thresholds`: calibrated Top-θ and tile-gate thresholds, their file format and validation.

Indexing (fixed project-wide): `theta[l, h, i]` and `sdc_delta[l, h, i]` apply to rows of length
n = i + 1; `tile_theta[l, h, b]` to prefill query tile b; `tile_theta_decode[l, h, t]` to a
decoding query that sees t + 1 key tiles. Lengths beyond the table use its last entry.

A `Thresholds` is a JAX pytree: the arrays are leaves (so new thresholds never recompile) and the
metadata is static. On disk it is one safetensors file whose JSON metadata (under the key
"condensa") records the model fingerprint and how the thresholds were calibrated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from condensa.attention import AttentionConfig
from condensa.errors import ThresholdsError

FORMAT_VERSION = 1
_ARRAYS = ("theta", "sdc_delta", "tile_theta", "tile_theta_decode")
_META = ("placement", "k", "layer_k", "sigma_add", "block_q", "block_k", "tile_budget", "sink_tiles",
         "samples", "data", "model", "topk_at_calibration")
_FINGERPRINT = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
# AttentionConfig fields a file settles: a caller who leaves them unset gets the file's values
FILE_SETTINGS = ("mode", "placement", "k", "layer_k", "tile_gate", "block_q", "block_k", "tile_budget", "sink_tiles")
_GEOMETRY = ("block_q", "block_k", "tile_budget", "sink_tiles")
# the python -m condensa.calibrate option that sets each field, for the advice in a conflict
_CALIBRATE_FLAG = {"placement": "--placement", "k": "--k", "layer_k": "--layer_k", "block_q": "--tile",
                   "block_k": "--tile", "tile_budget": "--tile_budget", "sink_tiles": "--sink_tiles"}


class LayerThresholds(NamedTuple):
    """One layer's view, [H, ...] arrays, for kernels and the reference ops."""

    theta: jax.Array
    sdc_delta: jax.Array
    tile_theta: jax.Array | None
    tile_theta_decode: jax.Array | None


def model_fingerprint(model_config) -> tuple[tuple[str, int], ...]:
    """The shape fields a thresholds file must agree with (a hashable tuple of pairs)."""
    return tuple((name, int(getattr(model_config, name))) for name in _FINGERPRINT)


@dataclasses.dataclass(frozen=True, eq=False)
class Thresholds:
    """θ [L, H, N], the calibrated SDC Δ̄ [L, H, N] and, with a gate, Θ [L, H, NQ] and Θ_dec [L, H, NK]."""

    theta: Any
    sdc_delta: Any
    tile_theta: Any = None
    tile_theta_decode: Any = None
    placement: str = "pre"
    k: int = 64
    layer_k: tuple[tuple[int, int], ...] = ()
    sigma_add: float = 0.1
    block_q: int | None = None
    block_k: int | None = None
    tile_budget: float | None = None
    sink_tiles: int | None = None
    samples: int = 0
    data: str = ""
    model: tuple[tuple[str, int], ...] = ()
    topk_at_calibration: bool = False

    # ---- views ---------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.theta.shape[0]

    @property
    def n_head(self) -> int:
        return self.theta.shape[1]

    @property
    def has_gate(self) -> bool:
        return self.tile_theta is not None

    def k_for(self, layer: int) -> int:
        return dict(self.layer_k).get(int(layer), int(self.k))

    def for_layer(self, layer: int) -> LayerThresholds:
        """Layer `layer`'s [H, ...] arrays."""
        pick = lambda a: None if a is None else a[layer]  # noqa: E731
        return LayerThresholds(*(pick(getattr(self, name)) for name in _ARRAYS))

    def lookup(self, layer: int, head: int, n: int) -> float:
        """θ for a row of length n (1-based); lengths past the table take its last entry."""
        table = np.asarray(self.theta[layer, head])
        return float(table[min(max(int(n), 1), table.shape[0]) - 1])

    # ---- checks --------------------------------------------------------------------------------

    def check_finite(self, source: str = "thresholds") -> None:
        for name in _ARRAYS:
            value = getattr(self, name)
            if value is not None and not np.all(np.isfinite(np.asarray(value))):
                raise ThresholdsError(
                    f"{source}: {name} holds NaN or infinite values; re-run python -m condensa.calibrate "
                    "with more samples or a longer --seq-len."
                )

    def validate(self, model_config, attention=None, *, source: str = "thresholds") -> "Thresholds":
        """Refuses thresholds for another model shape, or for an attention config they do not fit."""
        want = dict(model_fingerprint(model_config))
        have = dict(self.model)
        have.setdefault("n_layer", self.n_layer)
        have.setdefault("n_head", self.n_head)
        for name in ("n_layer", "n_head", "n_positions"):
            if name in have and have[name] != want[name]:
                raise ThresholdsError(
                    f"{source} was calibrated for a model with {name}={have[name]}, but this model has "
                    f"{name}={want[name]}; calibrate thresholds for this model (python -m condensa.calibrate)."
                )
        if self.n_layer != want["n_layer"] or self.n_head != want["n_head"]:
            raise ThresholdsError(
                f"{source} holds arrays for {self.n_layer} layers x {self.n_head} heads, but the model has "
                f"{want['n_layer']} x {want['n_head']}; calibrate thresholds for this model."
            )
        self.check_finite(source)
        if attention is not None:
            self.check_attention(attention, source=source)
        return self

    def validate_for(self, model_config, attention=None, *, source: str = "thresholds") -> "Thresholds":
        """Same as `validate` (the name the evaluation CLI uses)."""
        return self.validate(model_config, attention, source=source)

    def check_attention(self, attention, *, source: str = "thresholds") -> None:
        """The attention config must use the placement, k and tile geometry the file was calibrated for."""
        if attention.mode == "toptheta":
            if attention.placement != self.placement:
                raise ThresholdsError(
                    f"{source} was calibrated for placement={self.placement!r}, but the attention config asks "
                    f"for placement={attention.placement!r}; calibrate with --placement {attention.placement} "
                    f"or set placement={self.placement!r}."
                )
            want = tuple(attention.k_for(l) for l in range(self.n_layer))
            have = tuple(self.k_for(l) for l in range(self.n_layer))
            if want != have:
                raise ThresholdsError(
                    f"{source} was calibrated for per-layer k {list(have)}, but the attention config uses "
                    f"{list(want)}; set k/layer_k to match or re-calibrate."
                )
        if attention.gate_is_calibrated:
            if not self.has_gate:
                raise ThresholdsError(
                    f"{source} has no tile-gate thresholds; calibrate with --tile BLOCK --tile-budget F, "
                    "or turn the tile gate off."
                )
            ours = (self.block_q, self.block_k, self.tile_budget, self.sink_tiles)
            theirs = (attention.block_q, attention.block_k, attention.tile_budget, attention.sink_tiles)
            if tuple(map(float, ours)) != tuple(map(float, theirs)):
                raise ThresholdsError(
                    f"{source} gate was calibrated for (block_q, block_k, tile_budget, sink_tiles)={ours}, "
                    f"but the attention config uses {theirs}; match them or re-calibrate."
                )

    # ---- the attention rule the file was calibrated for ------------------------------------------

    def attention(self, **choices: Any) -> AttentionConfig:
        """The rule this file was calibrated for: Top-θ with its placement and per-layer k, behind its
        tile gate (block_q, block_k, tile_budget, sink_tiles) when it holds one. `choices` sets the
        fields the file does not record (sdc, vmc, backend, ...) and may override the file's where the
        thresholds can still serve the result (e.g. `tile_gate=False`); an override they cannot serve
        raises `ThresholdsError`. So a caller never repeats what the file already says."""
        return self.resolve(choices, given=choices, source="thresholds", flag="")

    def resolve(self, attention: AttentionConfig | dict[str, Any], given: Any = None, *,
                source: str = "thresholds", flag: str = "--attention.") -> AttentionConfig:
        """`attention` with every field of `FILE_SETTINGS` that the caller did not set taken from this
        file. `given`: the field names the caller set (a CLI knows them from its command line and
        YAML); None counts the fields that differ from AttentionConfig's defaults. A set field that
        differs from the file's is kept where the thresholds do not use it (k under top-k, the
        geometry of an uncalibrated tile selector) and refused where they do, naming the option as
        `flag` + field. Mode defaults to Top-θ and the gate to on when the file holds one."""
        values = attention if isinstance(attention, dict) else dataclasses.asdict(attention)
        if given is None:
            defaults = AttentionConfig()
            given = {name for name in FILE_SETTINGS if name in values and values[name] != getattr(defaults, name)}
        given = set(given) & set(values)
        ours: dict[str, Any] = {"mode": "toptheta", "placement": self.placement, "tile_gate": self.has_gate}
        if "k" not in given:
            ours["k"] = int(self.k)
        if "layer_k" not in given and ("k" not in given or int(values["k"]) == int(self.k)):
            ours["layer_k"] = self.layer_k  # the file's per-layer overrides go with its k, not with another
        if "tile_selector" in given and values["tile_selector"] != "gate":
            ours["tile_gate"] = True  # a budgeted selector only picks the gate's tiles
        if self.has_gate:
            ours.update({name: getattr(self, name) for name in _GEOMETRY})
        merged = {**values, **{name: value for name, value in ours.items() if name not in given}}
        result = AttentionConfig(**merged)
        conflicts = []
        if result.mode == "toptheta":
            if result.placement != self.placement:
                conflicts.append(("placement", self.placement))
            have = [self.k_for(l) for l in range(self.n_layer)]
            want = [result.k_for(l) for l in range(self.n_layer)]
            if have != want:
                conflicts.append(("k" if "k" in given else "layer_k", have if self.layer_k else self.k))
        if result.gate_is_calibrated and self.has_gate:
            conflicts += [(name, getattr(self, name)) for name in _GEOMETRY
                          if float(getattr(result, name)) != float(getattr(self, name))]
        if conflicts:
            name, theirs = conflicts[0]
            asked = values[name]
            if name == "layer_k":
                asked = ",".join(f"{l}:{k}" for l, k in result.layer_k) or '""'
            option = f"{flag}{name} {asked}" if flag.startswith("--") else f"{name}={asked!r}"
            left_out = f"{flag}{name}" if flag.startswith("--") else name
            raise ThresholdsError(
                f"{source} was calibrated for {name}={theirs!r}, but {option} differs and these thresholds cannot "
                f"serve it. Leave {left_out} out to use the file's value, or calibrate thresholds for it "
                f"(python -m condensa.calibrate {_CALIBRATE_FLAG[name]} ...).")
        self.check_attention(result, source=source)
        return result

    # ---- file format ---------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        meta = {name: getattr(self, name) for name in _META}
        meta["layer_k"] = [list(p) for p in self.layer_k]
        meta["model"] = dict(self.model)
        meta["format_version"] = FORMAT_VERSION
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the safetensors file (atomically: a crash never leaves half a file)."""
        from safetensors.numpy import save_file

        self.check_finite()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: np.ascontiguousarray(np.asarray(getattr(self, n), np.float32))
                   for n in _ARRAYS if getattr(self, n) is not None}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"condensa": json.dumps(self.metadata())})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Thresholds":
        """Reads a thresholds file; arrays come back as NumPy float32 (jnp converts them as needed)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ThresholdsError(f"thresholds file {path} does not exist; create it with python -m condensa.calibrate.")
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw_meta = (f.metadata() or {}).get("condensa")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ThresholdsError(f"{path} is not a readable safetensors file ({err}); re-run calibration.") from None
        if raw_meta is None or "theta" not in tensors or "sdc_delta" not in tensors:
            raise ThresholdsError(f"{path} is not a condensa thresholds file (no 'condensa' metadata or theta); "
                                  "create one with python -m condensa.calibrate.")
        meta = json.loads(raw_meta)
        if meta.pop("format_version", None) != FORMAT_VERSION:
            raise ThresholdsError(f"{path} has an unknown format version; re-run calibration with this condensa.")
        meta["layer_k"] = tuple(tuple(int(x) for x in p) for p in meta.get("layer_k", ()))
        meta["model"] = tuple(sorted(meta.get("model", {}).items()))
        unknown = set(meta) - set(_META)
        if unknown:
            raise ThresholdsError(f"{path} has unknown metadata keys {sorted(unknown)}; re-run calibration.")
        arrays = {name: tensors.get(name) for name in _ARRAYS}
        shapes = {name: a.shape for name, a in arrays.items() if a is not None}
        if any(len(s) != 3 or s[:2] != shapes["theta"][:2] for s in shapes.values()):
            raise ThresholdsError(f"{path} holds arrays of inconsistent shapes {shapes}; re-run calibration.")
        out = cls(**arrays, **meta)
        out.check_finite(str(path))
        return out


jax.tree_util.register_dataclass(Thresholds, data_fields=list(_ARRAYS), meta_fields=list(_META))


def load_thresholds(path: str | os.PathLike, model_config=None, attention=None) -> Thresholds:
    """Loads a thresholds file and, when given, validates it against the model and attention config."""
    out = Thresholds.load(path)
    if model_config is not None:
        out.validate(model_config, attention, source=str(path))
    return out


def fill_uncalibrated(values: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """Fills entries never calibrated by linear interpolation between calibrated ones along the
    last axis (nearest at the ends). values [..., N]; calibrated bool [..., N]. A row with nothing
    calibrated becomes 0: it is only ever used where the rule keeps everything anyway."""
    values = np.asarray(values, np.float64)
    out = np.zeros_like(values)
    flat_v, flat_c, flat_o = values.reshape(-1, values.shape[-1]), calibrated.reshape(-1, values.shape[-1]), out.reshape(-1, values.shape[-1])
    positions = np.arange(values.shape[-1])
    for row in range(flat_v.shape[0]):
        known = flat_c[row]
        if known.any():
            flat_o[row] = np.interp(positions, positions[known], flat_v[row, known])
    return out
