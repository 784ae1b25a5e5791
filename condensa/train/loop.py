"""The training loop: data -> model -> jitted steps, with evaluation, checkpoints, resume and export."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensa.checkpoint import CORRUPT_DIR, Checkpointer
from condensa.cli import check_writable, progress
from condensa.data import BatchIterator
from condensa.determinism import require_deterministic_ops
from condensa.errors import TrainingError
from condensa.train import parallel
from condensa.train.config import TrainConfig
from condensa.train.run_model import save_hf
from condensa.train.metrics_log import MetricsLog
from condensa.train.output_folder import check_compatible, write_config
from condensa.train.plots import report_training_plots
from condensa.train.progress import PlainProgress
from condensa.train.run_data import Data, load_data
from condensa.train.run_lock import RunLock
from condensa.train.setup import build_model, build_optimizer, learning_rate
from condensa.train.step import FlatState, make_eval_step, make_train_step


def _eval_batches(data: Data, cfg: TrainConfig) -> list[np.ndarray]:
    """Fixed validation batches (the first ones, in order), so every evaluation sees the same text."""
    size = min(cfg.train.batch_size, len(data.validation))
    n = min(cfg.train.eval_batches, len(data.validation) // size)
    return [data.validation[i * size : (i + 1) * size] for i in range(n)]


def _host(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@jax.jit
def _all_finite(state) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def train(cfg: TrainConfig, *, restart: bool = False) -> dict[str, float]:
    """Runs (or resumes) the training run described by `cfg`; returns the last evaluation.

    The output folder is checked for writing and locked for the run's lifetime before any work.
    `restart` starts over from step 0 when every checkpoint there is corrupt (otherwise refused)."""
    out = check_writable(cfg.out)
    with RunLock(out):
        return _train(cfg, out, restart)


def _train(cfg: TrainConfig, out: Path, restart: bool) -> dict[str, float]:
    if cfg.train.deterministic:
        require_deterministic_ops()  # before anything starts JAX's backend
    check_compatible(out, cfg)
    data = load_data(cfg)
    mesh = parallel.make_mesh(cfg.mesh.data)
    parallel.check_batch(mesh, cfg.train.batch_size)
    model, model_config = build_model(cfg, data.vocab_size)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.train.steps)
    graphdef, state = nnx.split((model, optimizer))
    shardings = parallel.state_shardings(state, mesh, cfg.mesh.fsdp)
    state = jax.device_put(state, shardings)
    train_step = make_train_step(graphdef, cfg.loss, state_shardings=shardings)
    eval_step = make_eval_step(graphdef, cfg.loss, cfg.loss.topk.k, cfg.data.seq_len,
                               attention_metrics=cfg.train.eval_attention_metrics)
    batch_sharding = parallel.batch_sharding(mesh)
    eval_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    accum = cfg.optimizer.grad_accum
    loader = BatchIterator(data.train, cfg.train.batch_size * accum, seed=cfg.train.seed)
    checkpoints = Checkpointer(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    log = MetricsLog(out)
    start = 0
    restored = checkpoints.restore_latest(state)
    corrupt = checkpoints.directory.parent / CORRUPT_DIR
    if restored is None and not restart and corrupt.is_dir() and any(corrupt.iterdir()):
        raise TrainingError(
            f"no checkpoint in {checkpoints.directory} reads back intact; the corrupt ones are in {corrupt}, and "
            "nothing else in the folder was changed. To start this run over from step 0 on purpose, run the same "
            "command with --restart.")
    if restored is not None:
        start, state, record = restored
        loader.restore(record["data"])
        print(f"resumed from step {start} of {checkpoints.directory}", file=sys.stderr, flush=True)
    log.truncate_after(start)  # a restart from step 0 drops the old lines too
    if restored is not None:  # in the log as well: stderr may be gone by the time someone asks
        log.write({"kind": "resume", "step": start, "checkpoints": str(checkpoints.directory)})
    write_config(out, cfg)
    flat = FlatState.of(state)
    del state  # the loop carries `flat`; `flat.state` rebuilds the nnx.State when one is needed

    def evaluate(step: int) -> dict[str, float]:
        # one sequence per call: the attention metrics hold [H, T, T] per layer, which for a whole
        # batch of long sequences does not fit (42 GiB for 4 x 8192 tokens on a 6-layer model)
        sums: dict[str, float] = {}
        sequences = [row[None] for batch in _eval_batches(data, cfg) for row in batch]
        for sequence in sequences:
            for k, v in _host(eval_step(flat, jax.device_put(sequence, eval_sharding))).items():
                sums[k] = sums.get(k, 0.0) + v / len(sequences)
        sums["val_ppl"] = math.exp(min(sums["val_loss"], 50.0))
        log.write({"kind": "eval", "step": step, **sums})
        return sums

    lr = learning_rate(cfg.optimizer, cfg.train.steps)
    tokens_per_step = cfg.train.batch_size * accum * cfg.data.seq_len
    last = {}
    bar = progress(total=cfg.train.steps, initial=start, desc="train", unit="step")
    plain = None if not bar.disable else PlainProgress(cfg.train.steps, start, tokens_per_step)  # no terminal
    if plain is not None:
        plain.begin(out)
    tick, ticked = time.perf_counter(), start

    def checked(done: int, metrics) -> dict[str, float]:
        metrics = _host(metrics)
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(
                f"the loss became {metrics['loss']} at step {done}; training stopped and nothing from that step "
                f"was saved (last good checkpoint: step {max(checkpoints.steps(), default=0)}). Lower optimizer.lr "
                "or the loss weights, or turn on optimizer.grad_clip."
            )
        return metrics

    def require_finite(done: int) -> None:  # the loss is from before the update: check what is saved
        if not bool(_all_finite(flat.state)):
            raise TrainingError(
                f"the parameters became non-finite at step {done}; training stopped and nothing from that step was "
                f"saved (last good checkpoint: step {max(checkpoints.steps(), default=0)}). Lower optimizer.lr or the "
                "loss weights, or turn on optimizer.grad_clip.")

    def next_batch():
        return parallel.put_batch(next(loader).reshape(accum, cfg.train.batch_size, cfg.data.seq_len + 1), batch_sharding)

    # Step s+1 is dispatched before step s's metrics are read, so the host's work (reading them,
    # the next batch, the call itself) overlaps the device's. A step whose state is evaluated or
    # saved has its metrics read first, so nothing after a NaN is ever written.
    pending = None if start >= cfg.train.steps else train_step(flat, next_batch(), jnp.int32(start))
    try:
        for step in range(start, cfg.train.steps):
            flat, pending_metrics = pending
            done = step + 1
            saves = done % cfg.checkpoint.every == 0 or done == cfg.train.steps
            evaluates = cfg.train.eval_batches > 0 and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
            # Dispatch the next step now unless this step's state is still needed (it is donated).
            dispatch_now = done < cfg.train.steps and not (saves or evaluates)
            pending = train_step(flat, next_batch(), jnp.int32(done)) if dispatch_now else None
            metrics = checked(done, pending_metrics)
            if plain is not None:
                plain.update(done, metrics)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                now = time.perf_counter()
                rate = tokens_per_step * (done - ticked) / max(now - tick, 1e-9)
                tick, ticked = now, done
                log.write({"kind": "train", "step": done, "lr": float(lr(step)), "tokens_per_s": rate, **metrics})
                bar.set_postfix(loss=f"{metrics['lm_loss']:.3f}", ppl=f"{math.exp(min(metrics['lm_loss'], 50)):.1f}",
                                L_conc=f"{metrics['L_conc']:.3f}", tok_s=f"{rate:,.0f}")
            if evaluates:
                last = evaluate(done)
                if plain is not None:
                    plain.evaluated(done, last)
            if saves:
                require_finite(done)
                checkpoints.save(done, flat.state, {"data": loader.state()})
            if pending is None and done < cfg.train.steps:
                pending = train_step(flat, next_batch(), jnp.int32(done))
            bar.update(1)
    finally:
        bar.close()
        checkpoints.close()  # waits for the async saves: a run never exits with a half-written checkpoint
        log.close()

    if cfg.train.export:
        model, _ = nnx.merge(graphdef, jax.device_get(flat.state))
        save_hf(model, model_config, out / "hf", tokenizer=data.tokenizer, kept_ids=data.kept_ids,
                vocab_size=data.vocab_size)
    if jax.process_index() == 0:  # one host draws them, into the shared run folder
        report_training_plots(out)
    return last
