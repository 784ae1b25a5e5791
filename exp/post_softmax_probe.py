"""Post-softmax Top-θ at k = 64 on SmolLM2 (2,048 tokens, 4 WikiText-2 windows, CPU): as the reference
runs it (no renormalisation), with VMC, and renormalised over the kept elements (a probe, patched
in: not a rule condensa offers). Thresholds: 4 calibration blocks of the config's books.

    PYTHONPATH=. python exp/post_softmax_probe.py      # about 20 minutes on 2 cores; runs/post_renorm.json
"""
import sys, json
sys.path.insert(0, "exp")
import numpy as np, jax, jax.numpy as jnp
from pathlib import Path
import condensa.attention as attention_module
import condensa.attention.toptheta as tt
from condensa.attention.dense import masked_softmax
from condensa.attention.rows import keep_largest_if_empty, masked_max, safe_divide
from real_model_tiles import LayerRunner, evaluate, windows_of, paired_delta
from condensa import AttentionConfig, load_pretrained
from condensa.data import load_tokenizer
from condensa.sparsity.calibration import CalibrationConfig, calibrate, load_blocks
import yaml
k, seq, nwin = 64, 2048, 4
model, _ = load_pretrained("smollm2-135m")
tok = load_tokenizer("smollm2-135m")
books = yaml.safe_load(open("configs/smollm2-calibrate.yaml"))["data"]
blocks, _ = load_blocks(CalibrationConfig(model="smollm2-135m", data=tuple(books), samples=4, seq_len=seq, batch_size=1, check_blocks=0, out="x"), tok, seq)
th = calibrate(model, blocks, k=k, placement="post", batch_size=1)
th.save("runs/post-k64.safetensors")
ids = np.asarray(tok(Path("../shared/data/wikitext-2-raw/wiki.test.raw").read_text())["input_ids"], np.int32)
wins = windows_of(ids, seq, nwin)
runner = LayerRunner(model)
dense = evaluate(runner, wins, AttentionConfig(), 512)
res = {}
r = evaluate(runner, wins, AttentionConfig(mode="toptheta", k=k, placement="post"), 512, th)
res["post (reference, no renorm)"] = paired_delta(r, dense)["delta_pct"]; print(res, flush=True)
r = evaluate(runner, wins, AttentionConfig(mode="toptheta", k=k, placement="post", vmc=True), 512, th)
res["post + vmc (reference)"] = paired_delta(r, dense)["delta_pct"]; print(res, flush=True)
def renormalised(scores, *, allowed, theta, dense_rows):
    m = masked_max(scores, allowed)
    e = jnp.exp(jnp.where(allowed, scores - m, -jnp.inf))
    p = safe_divide(e, e.sum(axis=-1, keepdims=True))
    keep = allowed & ((p > theta[..., None]) | dense_rows[..., None])
    keep = keep_largest_if_empty(keep, scores, allowed)
    return masked_softmax(scores, keep)
attention_module.toptheta_post_probs = renormalised
runner2 = LayerRunner(model)
r = evaluate(runner2, wins, AttentionConfig(mode="toptheta", k=k, placement="post"), 512, th)
res["post, renormalised"] = paired_delta(r, dense)["delta_pct"]; print(res, flush=True)
json.dump(res, open("runs/post_renorm.json", "w"), indent=1)
