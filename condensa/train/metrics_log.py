"""Where training metrics go: JSON lines always, TensorBoard when `tensorboardX` is installed.

tensorboardX is an optional extra (`pip install condensa[tensorboard]`): TensorBoard's event format
needs protobuf definitions that none of condensa's own dependencies carry.
"""

from __future__ import annotations

import math
from pathlib import Path

from condensa import jsonio
from condensa.cli import append_jsonl


class MetricsLog:
    def __init__(self, out: Path):
        self.path = Path(out) / "metrics.jsonl"
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self._tb = None
        else:
            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, record: dict) -> None:
        append_jsonl(self.path, record)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites them, so the log keeps one line per step."""
        if not self.path.is_file():
            return
        lines = [l for l in self.path.read_text().splitlines() if l.strip() and jsonio.loads(l).get("step", 0) <= step]
        self.path.write_text("".join(l + "\n" for l in lines))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order. A null there is a metric that was not finite (the
    writer turns NaN into null; nothing else in a record is ever null), so it reads back as NaN."""
    records = [jsonio.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: math.nan if v is None else v for k, v in record.items()} for record in records]
