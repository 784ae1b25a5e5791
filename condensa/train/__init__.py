"""Training: `python -m condensa.train` fine-tunes or pretrains GPT-2 with the concentration losses."""

from condensa.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig):
    """Runs the training described by `cfg` (see `condensa.train.loop.train`)."""
    from condensa.train.loop import train as _train  # lazy: __main__ needs it after jax.distributed.initialize()

    return _train(cfg)
