"""A training run's model, read back from its orbax checkpoints, and the HF directory made from it.

`python -m condensa.train` leaves OUT/config.yaml (the resolved config) and OUT/checkpoints/<step>/
(the flat state of (model, optimizer)). Reading a checkpoint needs that exact structure, so it is
rebuilt from the run's own config with the training code (`build_model`, `build_optimizer`): an
export can never disagree with what training saved. Nothing in the run folder is changed: a
checkpoint that does not read back is reported (and skipped when no step was asked for), never
moved aside as a resuming run would do.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from condensa.checkpoint import Checkpointer
from condensa.cli import load_config, write_json
from condensa.data import model_tokenizer
from condensa.errors import CheckpointError, CondensaError
from condensa.faults import kill_point
from condensa.model import load_pretrained, save_pretrained
from condensa.train.config import TrainConfig
from condensa.train.output_folder import CONFIG_FILE
from condensa.train.run_data import load_data, load_run_tokenizer
from condensa.train.setup import build_model, build_optimizer

CHECKPOINTS = "checkpoints"
VOCAB_MAP = "vocab_map.json"


@dataclasses.dataclass
class RunModel:
    """The model of one checkpoint, with what an export needs next to it."""

    model: object  # condensa GPT2 in eval mode, float32 compute
    config: object  # its GPT2Config
    step: int | None  # None for a model that comes from weights, not from a training run
    tokenizer: object | None
    kept_ids: np.ndarray | None  # with data.vocab_limit: the tokenizer id of each model id
    vocab_size: int
    run: Path  # the run's output folder


def find_run(path: str | Path) -> tuple[Path, TrainConfig]:
    """The run folder (given itself or its checkpoints/ folder) and the config it was trained with."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass the output folder of a python -m condensa.train run "
            f"(the --out folder, which holds {CONFIG_FILE} and {CHECKPOINTS}/)."
        )
    if not (path / CONFIG_FILE).is_file() and (path.parent / CONFIG_FILE).is_file():
        path = path.parent  # the checkpoints/ folder itself
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path} holds no {CONFIG_FILE}, so it is not the output folder of a python -m condensa.train run; "
            "pass the folder given to the run as --out."
        )
    return path, load_config(TrainConfig, path / CONFIG_FILE)


def checkpoint_steps(run: Path) -> list[int]:
    """The steps saved under run/checkpoints (without opening a checkpoint manager, which would
    create the folder): orbax names each finished checkpoint by its step number."""
    folder = run / CHECKPOINTS
    steps = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    if not steps:
        raise CheckpointError(
            f"{run} has no checkpoints in {folder}; train first (python -m condensa.train), or let the run "
            "reach checkpoint.every steps."
        )
    return steps


def restore_run(path: str | Path, step: int | None = None) -> RunModel:
    """The model at checkpoint `step` (default: the newest one that reads back intact)."""
    import jax
    from flax import nnx

    run, cfg = find_run(path)
    steps = checkpoint_steps(run)
    if step is not None and step not in steps:
        raise CheckpointError(f"{run} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}.")
    # Compute in float32 without remat: parameters are float32 either way, and the state's structure
    # (what the checkpoint is read into) does not depend on either setting.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="float32", remat=False))
    tokenizer, kept_ids, vocab_size = load_run_tokenizer(cfg), None, None
    if cfg.data.vocab_limit is not None:  # the id map is made from the training text
        data = load_data(cfg)
        tokenizer, kept_ids, vocab_size = data.tokenizer, data.kept_ids, data.vocab_size
    model, model_config = build_model(cfg, vocab_size or len(tokenizer))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.train.steps)
    graphdef, template = nnx.split((model, optimizer))
    # Every leaf on one device, as jax arrays: a pretrained model's parameters start as NumPy arrays,
    # which carry no sharding, and orbax would then restore them with the saved (training) sharding.
    template = jax.device_put(template, jax.sharding.SingleDeviceSharding(jax.devices()[0]))

    checkpoints = Checkpointer(run / CHECKPOINTS, keep=len(steps) + 1, async_save=False)
    try:
        errors = []
        candidates = list(reversed(steps)) if step is None else [step]
        for i, candidate in enumerate(candidates):
            try:
                state, _ = checkpoints.restore(candidate, template)
            except CheckpointError as err:
                errors.append(str(err))
                if i + 1 < len(candidates):
                    warnings.warn(f"{err} Using step {candidates[i + 1]} instead.", stacklevel=2)
                continue
            model, _ = nnx.merge(graphdef, jax.device_get(state))
            model.eval()
            return RunModel(model, model_config, candidate, tokenizer, kept_ids, vocab_size or len(tokenizer), run)
    finally:
        checkpoints.close()
    if step is not None:
        raise CheckpointError(f"{errors[0]} Pick another step with --step ({', '.join(map(str, steps))}).")
    raise CheckpointError(
        f"no checkpoint in {run / CHECKPOINTS} reads back intact ({'; '.join(errors)}). "
        "The files are truncated or corrupt: train again, or restore them from a backup."
    )


def with_run_weights(base, path: str | Path, step: int | None = None):
    """`base` (a model built like the run's, e.g. the pretrained model it was fine-tuned from) with
    the parameters of the run's checkpoint, each cast to the dtype `base` holds it in: training keeps
    float32 parameters, and a fine-tune should be judged in the same dtype as the model it came from."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    trained = nnx.state(restore_run(path, step).model, nnx.Param)
    nnx.update(base, jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), trained, nnx.state(base, nnx.Param)))
    return base


def loaded_model(name: str) -> RunModel:
    """Any model `load_pretrained` reads (a GGUF file, a named model, an HF directory), as an export
    source: float32 compute, its own tokenizer when it has one."""
    model, config = load_pretrained(name)
    try:
        tokenizer = model_tokenizer(name)
    except CondensaError as err:  # a model without a tokenizer still converts; the CLI says so
        warnings.warn(f"{err} Writing the model without a tokenizer.", stacklevel=2)
        tokenizer = None
    return RunModel(model, config, None, tokenizer, None, config.vocab_size, Path(name))


def save_hf(model, model_config, path: str | Path, *, tokenizer, kept_ids: np.ndarray | None = None,
            vocab_size: int | None = None) -> Path:
    """The Hugging Face directory of a trained model: config.json + model.safetensors + the tokenizer.

    With data.vocab_limit the model's ids are not the tokenizer's, so the tokenizer (which would
    mislead) is replaced by vocab_map.json, the tokenizer id of each model id.
    """
    if kept_ids is None:
        return save_pretrained(model, model_config, path, tokenizer=tokenizer)
    path = save_pretrained(model, model_config, path)
    kill_point("export")  # for the fault-injection tests: weights written, the vocabulary map not yet
    write_json(Path(path) / VOCAB_MAP, {"tokenizer_id_of_model_id": np.asarray(kept_ids).tolist(),
                                        "other_tokens_id": int(vocab_size - 1)})
    return path
