"""Where a benchmark's device time goes: capture a profiler trace of a few calls, then sum the
device-side events by name.

`jax.profiler` writes a Perfetto trace (Chrome trace JSON) next to its TensorBoard files; reading
that JSON needs nothing beyond the standard library, whereas the TensorBoard profile plugin is not
a dependency of condensa and is absent on most GPU machines. Device events are the ones whose
process is named after a GPU/TPU stream (`/device:GPU:0 ...`); host events are left out.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax


def capture(run_once: Callable[[], Any], log_dir: str | pathlib.Path, *, calls: int = 3) -> pathlib.Path:
    """Runs `run_once` `calls` times back to back under the profiler; returns the Perfetto trace
    file written. XLA's GPU command buffers show as one event; for a per-kernel breakdown, run
    with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (which also changes the timing a little)."""
    log_dir = pathlib.Path(log_dir)
    jax.block_until_ready(run_once())  # compiled and warm before the trace starts
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for _ in range(calls - 1):
            run_once()
        jax.block_until_ready(run_once())
    traces = sorted(log_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {log_dir}")
    return traces[-1]


def _device_pids(events: list[dict]) -> set:
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name.upper()}


def device_time_by_name(trace_file: str | pathlib.Path) -> dict[str, float]:
    """Total device microseconds per event name (kernel or XLA op) in one trace file."""
    with gzip.open(trace_file, "rt") as fh:
        events = json.load(fh).get("traceEvents", [])
    pids = _device_pids(events)
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids:
            args = e.get("args", {})
            name = args.get("hlo_op") or args.get("long_name") or e.get("name", "?")
            totals[name] += float(e.get("dur", 0.0))
    return dict(totals)


def summary_lines(totals: dict[str, float], *, calls: int, top: int = 25) -> list[str]:
    """A Markdown table of the `top` names by device time per call, with their share of the total."""
    total = sum(totals.values())
    lines = [f"device time per call: {total / calls / 1e3:.2f} ms over {len(totals)} distinct ops",
             "| op | ms per call | share |", "| --- | ---: | ---: |"]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{name[:90]}` | {us / calls / 1e3:.3f} | {100 * us / max(total, 1e-9):.1f}% |")
    return lines
