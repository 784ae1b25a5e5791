"""One run per output folder: a lock file held for the run's lifetime.

Two runs in one folder would splice metrics.jsonl, config.yaml and hf/ and both exit 0. The lock
is a file created with O_EXCL (atomic on every local filesystem) holding the owner's pid, host and
start time. A lock whose pid is gone on this host is stale: a killed run's, taken over with a
warning. A lock from another host cannot be checked, so it is honoured.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import warnings
from pathlib import Path

from condensa import jsonio
from condensa.errors import TrainingError

LOCK_FILE = "run.lock"


class StaleLockWarning(UserWarning):
    """The output folder's lock belonged to a run that is no longer running; it was taken over."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then the create is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(jsonio.dumps(me))
            self.held = True
            return self
        raise TrainingError(f"could not take the lock {self.path}: other runs keep taking it. Use another --out.")

    def _take_over_if_stale(self, me: dict) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder["started"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            raise TrainingError(f"{self.folder} holds an unreadable lock file {self.path}. If no run is using this "
                                "folder, delete that file and start again.") from None
        if host != me["host"] or (pid != me["pid"] and _alive(pid)):
            raise TrainingError(
                f"{self.folder} is in use by another run (pid {pid} on {host}, started {started}). Wait for it to "
                f"finish or use another --out; if that run is gone, delete {self.path}.")
        warnings.warn(f"taking over the lock of {self.folder} from pid {pid} (started {started}), which is no "
                      "longer running.", StaleLockWarning, stacklevel=3)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass  # gone already, or not ours: leave it

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
