"""The training objective: next-token cross-entropy plus the weighted concentration losses."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensa.attention import is_plain_dense
from condensa.attention.dense import attention_scores, masked_softmax
from condensa.errors import ConfigError
from condensa.kernels.attention_masses import fits, limit_text
from condensa.sparsity import loss as conc
from condensa.sparsity import loss_from_qk
from condensa.train.config import LossConfig
from condensa.kernels.tiling.pooling import tile_masses
from condensa.train.cross_entropy import cross_entropy


def ramp(weight: float, warmup_steps: int, step) -> jax.Array:
    """λ at `step`: linear from 0 to `weight` over `warmup_steps` (constant when 0)."""
    if warmup_steps <= 0:
        return jnp.float32(weight)
    return jnp.float32(weight) * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)


def concentration_terms(probs, cfg: LossConfig, inputs=None) -> dict[str, jax.Array]:
    """The active losses' values (unweighted), each averaged over its layers. The `select` loss
    also needs each layer's `AttentionInputs` (its selector scores tiles from q and k)."""
    terms = {}
    if cfg.topk.weight > 0:
        terms["topk"] = conc.mean_over_layers(functools.partial(conc.topk_loss, k=cfg.topk.k), probs, cfg.topk.layers)
    if cfg.tile.weight > 0:
        fn = functools.partial(conc.tile_loss, block=cfg.tile_size, f=cfg.tile.f, sink_tiles=cfg.sink_tiles)
        terms["tile"] = conc.mean_over_layers(fn, probs, cfg.tile.layers)
    if cfg.gate.weight > 0:
        fn = functools.partial(conc.gate_loss, block=cfg.tile_size, tau=cfg.gate.tau, sink_tiles=cfg.sink_tiles)
        terms["gate"] = conc.mean_over_layers(fn, probs, cfg.gate.layers)
    if cfg.select.weight > 0:
        masses = [tile_masses(p, cfg.tile_size, cfg.tile_size) for p in probs]
        fn = lambda i: loss_from_qk.select_loss(inputs[i], masses[i], cfg)  # noqa: E731
        terms["select"] = conc.mean_over_layers(fn, list(range(len(probs))), cfg.select.layers)
    return terms


def probabilities_of(inputs) -> list[jax.Array]:
    """Each layer's causal prefill probabilities [B, H, T, T] from its q and k (the reference
    path of the `select` loss, which needs both)."""
    probs = []
    for x in inputs:
        t = x.q.shape[1]
        visible = jnp.tril(jnp.ones((t, t), bool))[None, None]
        probs.append(masked_softmax(attention_scores(x.q, x.k, x.scale), visible))
    return probs


def uses_mass_kernel(model, cfg: LossConfig, seq_len: int) -> bool:
    """Whether the losses run on the fused mass kernel (`LossConfig.kernel`). It computes dense
    softmax masses, so it applies only where the model's attention is plain dense in every layer.
    `auto` also keeps to one device: XLA cannot partition a Pallas call over a mesh, so with
    several devices it would gather every device's q and k first (wrapping the kernel in
    `shard_map` over the data axis is the way to lift this)."""
    if not cfg.active or cfg.kernel == "reference":
        return False
    blockers = []
    if not all(is_plain_dense(model.attention, i) for i in range(model.config.n_layer)):
        blockers.append(f"the model's attention is not plain dense (mode={model.attention.mode!r})")
    calls = [(loss_from_qk.TOPK_TILE, cfg.topk.k)] if cfg.topk.weight > 0 else []
    if cfg.tile.weight > 0 or cfg.gate.weight > 0 or cfg.select.weight > 0:
        calls.append((cfg.tile_size, None))
    for tile, top_k in calls:
        if not fits(seq_len, tile, top_k):
            blockers.append(f"data.seq_len={seq_len} is past the kernel's {limit_text(tile, top_k)}")
    if cfg.kernel == "pallas" and blockers:
        raise ConfigError(f"loss.kernel=pallas cannot run here: {'; '.join(blockers)}. Use loss.kernel reference "
                          "(or auto, which picks it in such cases).")
    return not blockers and (cfg.kernel == "pallas" or (jax.default_backend() == "gpu" and jax.device_count() == 1))


def objective(model, batch: jax.Array, cfg: LossConfig, step) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) for a batch of blocks [B, T + 1]; all in float32."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    fused = uses_mass_kernel(model, cfg, inputs.shape[1])
    selecting = cfg.select.weight > 0  # its selector reads q and k, so the reference path takes them too
    out = model(inputs, return_attention="inputs" if fused or selecting else cfg.active, loss_logits=True)
    lm = cross_entropy(out.logits, targets)
    total, metrics = lm, {"lm_loss": lm}
    conc_total = jnp.float32(0.0)
    if fused:
        terms = loss_from_qk.concentration_terms(out.attentions, cfg)
    elif selecting:
        terms = concentration_terms(probabilities_of(out.attentions), cfg, out.attentions)
    else:
        terms = concentration_terms(out.attentions, cfg)
    for name, value in terms.items():
        term = getattr(cfg, name)
        conc_total = conc_total + ramp(term.weight, term.warmup_steps, step) * value
        metrics[f"L_{name}"] = value
    total = total + conc_total
    metrics["L_conc"] = conc_total
    metrics["loss"] = total
    return total, metrics
