"""Timing helpers every benchmark shares: warm-up, then the median of repeats, each one blocked
until the device is done (JAX dispatch is asynchronous, so a host clock alone measures nothing)."""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from condensa.errors import ConfigError


def measure(run_once: Callable[[], Any], *, warmup: int = 3, repeats: int = 10, calls_per_repeat: int = 1) -> dict[str, float]:
    """Seconds per call of `run_once` (which returns arrays to wait for): median, min, max.

    With `calls_per_repeat` > 1 each repeat dispatches that many calls back to back and waits
    once, as a training loop does: the host's dispatch of call i+1 then overlaps call i on the
    device, and the time per call is the repeat's time divided by the count."""
    for _ in range(warmup):
        jax.block_until_ready(run_once())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_repeat - 1):
            run_once()
        jax.block_until_ready(run_once())
        times.append((time.perf_counter() - start) / calls_per_repeat)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "calls_per_repeat": calls_per_repeat}


def measure_unrolled(fn: Callable[..., Any], input_sets: list[tuple], *, warmup: int = 2,
                     repeats: int = 10) -> dict[str, float]:
    """Seconds per call of `fn` on the device: one jit runs it once per input set, so the host's
    dispatch (tens of microseconds for a jit with several launches, more than a small kernel takes
    on the device) is paid once for them all. The input sets must differ, or XLA would compute
    the calls once."""
    every = jax.jit(lambda sets: [fn(*inputs) for inputs in sets])
    timing = measure(lambda: every(input_sets), warmup=warmup, repeats=repeats)
    n = len(input_sets)
    return {**{key: timing[key] / n for key in ("median_s", "min_s", "max_s")}, "repeats": repeats,
            "calls_per_repeat": n, "unrolled": True}


def environment() -> dict[str, Any]:
    """What a benchmark table must name: the device, the software versions and the date."""
    import flax

    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "platform": device.platform,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def header(env: dict[str, Any]) -> str:
    """One line for docs/benchmarks.md under a table."""
    return (f"{env['device']} ×{env['device_count']} ({env['platform']}), jax {env['jax']}, flax {env['flax']}, "
            f"Python {env['python']}, {env['date']}")


# Dense bf16 matrix peak per device, for MFU. Datasheet numbers (H100/H200 SXM: 989 TFLOP/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def relative_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; infinite when `out` holds a NaN or an infinity."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def check_kernel_shapes(dtype: str, head_dims) -> None:
    """The dtypes and head widths the attention kernels take, refused before anything is built."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype {dtype!r} is not supported; use bfloat16, float16 or float32.")
    for d in head_dims:
        if d not in (64, 128):
            raise ConfigError(f"head_dims must be 64 or 128 (the kernel's); got {d}.")


def correctness_summary(records: list[dict], describe) -> list[str]:
    """The lines that report the correctness checks run before timing: how many passed, and the
    worst relative error with `describe(record)` naming its case."""
    checks = [r for r in records if r.get("kind") == "check"]
    if not checks:
        return []
    worst = max(checks, key=lambda r: r["rel_error"])
    return ["", f"correctness: {sum(r['ok'] for r in checks)}/{len(checks)} checks within tolerance; "
                f"worst rel. error {worst['rel_error']:.2e} ({describe(worst)})"]


def jit_with_options(fn: Callable, **options: Any) -> Callable:
    """`fn` as one jitted call, with `options` split by kind: `jax.Array` options become traced
    keyword arguments of every call; everything else, NumPy arrays included, is fixed at trace time
    (baked in as constants).

    Why: a kernel wrapper called eagerly pays its Python (argument checks, building its options,
    dispatching several small ops) on every call. Inside a model's jitted step that cost is paid
    once, at trace time, so timing the eager call overstates what a user's step takes; for a
    decode step of a few tens of µs it dominated (docs/benchmarks.md). Returns
    `call(*args, **more_arrays)`; calls with arrays of the same shapes share one compilation, also
    across calls of this function with the same `fn` and the same hashable fixed options (the
    study times one rule on every layer: one compile instead of six)."""
    arrays = {name: value for name, value in options.items() if isinstance(value, jax.Array)}
    fixed = tuple(sorted((name, value) for name, value in options.items() if name not in arrays))
    try:
        jitted = _jitted(fn, fixed)
    except TypeError:  # an unhashable option (a NumPy array): a trace of its own
        jitted = _jitted.__wrapped__(fn, fixed)
    return lambda *args, **more: jitted(args, {**arrays, **more})


@functools.lru_cache(maxsize=256)
def _jitted(fn: Callable, fixed: tuple) -> Callable:
    options = dict(fixed)
    return jax.jit(lambda args, kwargs: fn(*args, **kwargs, **options))


@functools.lru_cache(maxsize=16)
def first_output(kernel: Callable) -> Callable:
    """`kernel(*args, **kwargs)[0]` as one function per kernel, so that `jit_with_options` can reuse
    its compilation (a fresh lambda per call would be a new function each time)."""
    return lambda *args, **kwargs: kernel(*args, **kwargs)[0]
