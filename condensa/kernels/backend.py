"""Which Pallas lowering runs a kernel: chosen from the default device's platform, with an override.

A kernel is written once with `pl.pallas_call` and `BlockSpec`s; the backend decides how it is
compiled. On a CUDA GPU it goes through the Triton lowering (the generic `pallas_call` path;
Mosaic GPU needs the warpgroup-style `plgpu.kernel` API, see docs/kernels.md). On CPU there is no
compiler for Pallas, so the kernel body is evaluated by the interpreter (slow, exact: for tests).
The override is the `backend=` argument or the environment variable `CONDENSA_KERNEL_BACKEND`.
"""

from __future__ import annotations

import os

import jax

from condensa.errors import ConfigError

BACKENDS = ("triton", "interpret")
ENV_VAR = "CONDENSA_KERNEL_BACKEND"
_BY_PLATFORM = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "cpu": "interpret"}


def resolve_backend(backend: str | None = None) -> str:
    """'auto' (or None) picks by platform; an explicit name is checked against the platform."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    platform = jax.default_backend()
    if name == "auto":
        if platform not in _BY_PLATFORM:
            raise ConfigError(
                f"no Pallas prefill kernel for platform {platform!r} yet (only GPU via Triton, and CPU "
                f"interpret mode); use attention backend 'reference' there, or set {ENV_VAR}=interpret."
            )
        return _BY_PLATFORM[platform]
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown kernel backend {name!r}; choose one of auto, {', '.join(BACKENDS)} "
            f"(argument backend= or ${ENV_VAR})."
        )
    if name == "triton" and platform not in ("gpu", "cuda", "rocm"):
        raise ConfigError(
            f"kernel backend 'triton' needs a GPU but JAX runs on {platform!r}; use 'interpret' "
            f"(or 'auto') on this machine."
        )
    return name
