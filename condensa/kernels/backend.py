"""Which Pallas lowering runs a kernel: chosen from the default device's platform, with an override.

A kernel is written once with `pl.pallas_call` and `BlockSpec`s; the backend decides how it is
compiled. On a CUDA GPU it goes through the Triton lowering (the generic `pallas_call` path;
Mosaic GPU needs the warpgroup-style `plgpu.kernel` API, see docs/kernels.md). On a TPU the
prefill and decode kernels have Mosaic TPU twins (`mosaic_tpu`: scalar-prefetched tile lists,
VMEM state, explicit DMAs); `tpu_interpret` runs them in Pallas' TPU interpret mode on the CPU, for
tests. The training-loss kernel has no TPU twin. On CPU
there is no compiler for Pallas, so the kernel body is evaluated by the interpreter (slow, exact).
The override is the `backend=` argument or the environment variable `CONDENSA_KERNEL_BACKEND`.
"""

from __future__ import annotations

import os

import jax

from condensa.errors import ConfigError

BACKENDS = ("triton", "interpret", "mosaic_tpu", "tpu_interpret")
TPU_BACKENDS = ("mosaic_tpu", "tpu_interpret")  # the TPU twins, compiled or interpreted on the CPU
ENV_VAR = "CONDENSA_KERNEL_BACKEND"
_BY_PLATFORM = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "cpu": "interpret", "tpu": "mosaic_tpu"}


def resolve_backend(backend: str | None = None) -> str:
    """'auto' (or None) picks by platform; an explicit name is checked against the platform."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    platform = jax.default_backend()
    if name == "auto":
        if platform not in _BY_PLATFORM:
            raise ConfigError(
                f"no Pallas kernel for platform {platform!r} (GPU via Triton, TPU via Mosaic, CPU "
                f"interpret mode); use attention backend 'reference' there, or set {ENV_VAR}=interpret."
            )
        return _BY_PLATFORM[platform]
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown kernel backend {name!r}; choose one of auto, {', '.join(BACKENDS)} "
            f"(argument backend= or ${ENV_VAR})."
        )
    if name == "mosaic_tpu" and platform != "tpu":
        raise ConfigError(f"kernel backend 'mosaic_tpu' needs a TPU but JAX runs on {platform!r}; use 'tpu_interpret' "
                          "to run the TPU kernel on this machine's CPU, or 'auto'.")
    if name == "triton" and platform not in ("gpu", "cuda", "rocm"):
        raise ConfigError(
            f"kernel backend 'triton' needs a GPU but JAX runs on {platform!r}; use 'interpret' "
            f"(or 'auto') on this machine."
        )
    return name
