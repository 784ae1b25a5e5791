"""Named points where a test may kill the process on purpose (SIGKILL, no cleanup), to prove
that a run killed there resumes to the same result. Set CONDENSA_KILL_AT=<point> in the
environment of a child process; unset, each point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

KILL_POINTS = ("checkpoint-save", "export")  # inside an (async) checkpoint save; inside the final export


def kill_point(name: str, step: int | None = None) -> None:
    """Dies here when CONDENSA_KILL_AT is `name` (or `name:step` for this step)."""
    wanted = os.environ.get("CONDENSA_KILL_AT")
    if wanted and wanted in (name, f"{name}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
