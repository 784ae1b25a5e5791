"""Bit-identical training on GPUs, through XLA's switch for deterministic ops.

Two things on a GPU add in an order that changes from run to run: the embedding's gradient (a
scatter-add over token ids) and cuDNN's flash-attention backward (docs/results.md, Determinism).
XLA's switch makes scatters deterministic; dense attention must then leave cuDNN for XLA, because
cuDNN's fused attention does not compile under the switch. XLA reads its flags once, when JAX
starts its backend, so the switch must be in XLA_FLAGS before the first computation.
"""

from __future__ import annotations

import os

from jax._src import xla_bridge  # no public API says whether JAX's backend has started

from condensa.errors import ConfigError

DETERMINISTIC_FLAGS = ("--xla_gpu_exclude_nondeterministic_ops=true",)


def _xla_flags() -> list[str]:
    return os.environ.get("XLA_FLAGS", "").split()


def deterministic_ops() -> bool:
    """Whether this process runs under XLA's deterministic-op switch (either spelling of it)."""
    flags = _xla_flags()
    return any(f in flags for f in (*DETERMINISTIC_FLAGS, "--xla_gpu_deterministic_ops=true"))


def require_deterministic_ops() -> None:
    """Puts the switch in XLA_FLAGS, or refuses if JAX's backend already started without it."""
    if deterministic_ops():
        return
    missing = [f for f in DETERMINISTIC_FLAGS if f not in _xla_flags()]
    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            "train.deterministic needs XLA's switch before JAX starts, and this process has already started it; "
            f"run it as XLA_FLAGS='{' '.join(missing)}' python -m condensa.train ... (or drop train.deterministic)."
        )
    os.environ["XLA_FLAGS"] = " ".join([*_xla_flags(), *missing])
