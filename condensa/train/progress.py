"""What a training run says while it runs and when it ends, for a terminal and for a log file.

On a terminal the tqdm bar shows progress. Without one (stderr sent to a file, CI, a job
scheduler) the bar is off, and a run used to stay silent for minutes; `PlainProgress` prints plain
lines there instead, at a steady pace. `describe_folder` says at the end where the results went.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

EVERY_SECONDS = 30.0  # a plain line at least this often...
EVERY_SHARE = 0.1  # ...and at every further tenth of the steps, so a short run reports too


def _duration(seconds: float) -> str:
    """An ETA as a person reads it: seconds, minutes and seconds, or hours and minutes."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress:
    """Progress lines for a log file: step, loss, tokens/s and ETA, every `every_seconds` or every
    `every_share` of the steps, whichever comes first, and at the last step.

    The rate is measured from the end of the first step of this process on, so the compilation it
    holds does not distort tokens/s or the ETA; evaluations and checkpoints between two lines count,
    as they will for the rest of the run. The lines go to stdout (by default): stderr keeps to
    warnings and errors, so a failed run's stderr is still its one error line.
    """

    def __init__(self, total: int, start: int, tokens_per_step: int, *, every_seconds: float = EVERY_SECONDS,
                 every_share: float = EVERY_SHARE, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.start, self.tokens_per_step = total, start, tokens_per_step
        self.every_seconds = every_seconds
        self.every_steps = max(1, math.ceil(every_share * total))
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.origin: tuple[int, float] | None = None  # (step, time) after the first step: the rate's start
        self.last: tuple[int, float] = (start, clock())  # the previous line

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, out: Path) -> None:
        left = self.total - self.start
        if left <= 0:
            self._say(f"nothing left to train: the run in {out} is at step {self.start} of {self.total}")
            return
        self._say(f"training steps {self.start + 1}-{self.total} ({left} to go) -> {out}; the first step compiles, "
                  f"then a line every {self.every_seconds:g} s or {self.every_steps} steps")

    def update(self, done: int, metrics: dict[str, float]) -> None:
        """After step `done`, with its metrics (host floats: `loss`, `lm_loss`)."""
        now = self.clock()
        if self.origin is None:
            self.origin = self.last = (done, now)
            if done < self.total:
                return
        last_step, last_time = self.last
        due = (done == self.total or now - last_time >= self.every_seconds
               or done // self.every_steps > last_step // self.every_steps)
        if not due:
            return
        first_step, first_time = self.origin
        line = (f"step {done}/{self.total} ({done / self.total:.0%})  loss {metrics['loss']:.4f} "
                f"(lm {metrics['lm_loss']:.4f})")
        if done > first_step:
            steps_per_s = (done - first_step) / max(now - first_time, 1e-9)
            line += f"  {steps_per_s * self.tokens_per_step:,.0f} tokens/s"
            line += f"  ETA {_duration((self.total - done) / steps_per_s)}" if done < self.total else "  done"
        self._say(line)
        self.last = (done, now)

    def evaluated(self, done: int, results: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in results.items())
        self._say(f"step {done} evaluation: {shown}")


# file or folder name -> what it holds, for the closing summary
_CONTENTS = {
    "config.yaml": "the resolved config of this run (the same command resumes it)",
    "metrics.jsonl": "training and evaluation metrics, one JSON object per line (keys: docs/metrics.md)",
    "tensorboard": "TensorBoard events (tensorboard --logdir {path})",
    "checkpoints": "orbax checkpoints",
    "hf": "the final model in Hugging Face format (python -m condensa.eval ppl --model {path})",
}


def describe_folder(out: Path) -> str:
    """Where a run's results are and what each entry of the folder holds."""
    out = Path(out).expanduser()
    entries = sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    lines = [f"results in {out}:"]
    width = max((len(p.name) + p.is_dir() for p in entries), default=0)
    for path in entries:
        name = path.name + ("/" if path.is_dir() else "")
        text = _CONTENTS.get(path.name, "a figure" if path.suffix == ".png" else "")
        if path.name == "checkpoints":
            steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
            text += f" of steps {', '.join(map(str, steps))}" if steps else ""
        lines.append(f"  {name:<{width}}  {text.format(path=path)}".rstrip())
    return "\n".join(lines)
