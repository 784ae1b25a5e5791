"""What GPT-2's and the LLaMA family's weight maps share: a table of (HF tensor name -> NNX path).

Each family's converter (`gpt2.convert`, `llama.convert`) owns its table and its copy loop (GPT-2
reads a whole state dict, the LLaMA family streams tensors and transposes matrices); both look a
parameter up by its path in `nnx.state` and report a checkpoint that does not fit in one error
that lists every problem, so a user fixes them all at once instead of one per attempt.
"""

from __future__ import annotations

from condensa.errors import CheckpointError


def param_at(state, path: tuple):
    """The `nnx.Param` at `path` (attribute names and layer indices) in `state`."""
    node = state
    for key in path:
        node = node[key]
    return node


def raise_mismatches(problems: list[str], *, source: str) -> None:
    """A `CheckpointError` listing `problems` (missing, unexpected or misshapen tensors), if any."""
    if problems:
        listed = "\n  - ".join(problems)
        raise CheckpointError(
            f"{source} does not match its config.json ({len(problems)} problem(s)):\n  - {listed}\n"
            "Check that config.json belongs to these weights, or re-export the checkpoint."
        )
