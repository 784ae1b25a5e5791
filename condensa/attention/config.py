"""`AttentionConfig`: which attention rule each layer runs. The sparse modes arrive with the sparsity work."""

from __future__ import annotations

import dataclasses

from condensa.errors import ConfigError

MODES = ("dense",)
BACKENDS = ("reference",)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static (hashable) choice of attention rule; a change recompiles, a threshold change does not."""

    mode: str = "dense"
    backend: str = "reference"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"attention mode {self.mode!r} is not supported; choose one of {', '.join(MODES)}.")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"attention backend {self.backend!r} is not supported; choose one of {', '.join(BACKENDS)}."
            )
