"""Peak memory of this process: the host's resident set and the device's bytes in use.

Memory claims (calibration at full length, long contexts) are read from here in the experiment
scripts, so every table reports the same two numbers.
"""

from __future__ import annotations

from pathlib import Path

import jax


def host_peak_bytes() -> int:
    """VmHWM: the process's peak resident set so far (-1 where /proc is not available). On a GPU
    machine it counts host buffers only."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return -1
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def device_peak_bytes() -> int | None:
    """The first device's peak bytes in use, or None where the device keeps no statistics (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", -1))


def peaks() -> dict:
    """{"host_vmhwm_gib", "device_peak_gib" (None on a CPU)}."""
    device = device_peak_bytes()
    return {"host_vmhwm_gib": host_peak_bytes() / 2**30, "device_peak_gib": None if device is None else device / 2**30}
