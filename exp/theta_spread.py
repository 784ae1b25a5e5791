"""How much do the rows of one (layer, head, row length) differ in their (k+1)-th largest score,
the per-row threshold that exact top-k would use? A single Top-θ per (layer, head, length) can
only match top-k row by row if they do not. Also measured: how much of that spread a per-row
reference would remove (the row's log-sum-exp, i.e. thresholding probabilities; the query norm),
and how often the row's largest score is on the first key (an attention sink).

    PYTHONPATH=. python exp/theta_spread.py 2048 64 2      # T, k, WikiText-2 windows; CPU, a few minutes

Writes runs/theta_spread_{T}_{k}.json: per layer and row-length bucket, the mean over heads of the
std over rows of the (k+1)-th largest scaled logit: absolute ("abs"), minus the row's
log-sum-exp ("lse"), and scaled by the row's query norm over the mean norm ("qnorm").
"""
import argparse
import json
import numpy as np, jax, jax.numpy as jnp
from pathlib import Path
from condensa import AttentionConfig, load_pretrained
from condensa.data import load_tokenizer
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("seq", type=int, help="window length T in tokens")
parser.add_argument("k", type=int, help="the top-k whose (k+1)-th largest score is measured")
parser.add_argument("windows", type=int, help="WikiText-2 test windows")
args = parser.parse_args()
seq, k, nwin = args.seq, args.k, args.windows
model, config = load_pretrained("smollm2-135m")
tok = load_tokenizer("smollm2-135m")
ids = np.asarray(tok(Path("../shared/data/wikitext-2-raw/wiki.test.raw").read_text())["input_ids"], np.int32)
wins = ids[: nwin * seq].reshape(nwin, seq)

@jax.jit
def stats(q, kk, scale):
    a = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), kk.astype(jnp.float32)) * scale
    t = a.shape[-1]
    vis = jnp.tril(jnp.ones((t, t), bool))
    a = jnp.where(vis, a, -jnp.inf)
    top = jax.lax.top_k(a, k + 1)[0][..., k]  # (k+1)-th largest
    lse = jax.nn.logsumexp(a, axis=-1)
    argmax0 = jnp.argmax(a, -1) == 0
    qn = jnp.linalg.norm(q.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
    qscaled = top / qn * qn.mean(-1, keepdims=True)
    return top, top - lse, qscaled, argmax0

allv = [[] for _ in range(config.n_layer)]
for w in wins:
    res = model.walk_layers(jnp.asarray(w[None]), AttentionConfig(), None,
                            lambda l, q, kk, v, scale: stats(q, kk, scale))
    for l, r in enumerate(res):
        allv[l].append([np.asarray(x[0]) for x in r])
buckets = [(k, 2 * k), (2 * k, 4 * k), (4 * k, seq)]
out = {}
for l in range(config.n_layer):
    arrs = [np.concatenate([w[i] for w in allv[l]], axis=1) for i in range(4)]  # [H, N*T]
    n = np.tile(np.arange(1, seq + 1), len(allv[l]))
    entry = {}
    for lo, hi in buckets:
        sel = (n > lo) & (n <= hi)
        entry[f"{lo+1}-{hi}"] = {name: float(np.mean(np.std(arrs[i][:, sel], axis=1)))
                                 for i, name in enumerate(("abs", "lse", "qnorm"))}
        entry[f"{lo+1}-{hi}"]["argmax_is_key0"] = float(arrs[3][:, sel].mean())
    out[l] = entry
Path("runs").mkdir(exist_ok=True)
json.dump(out, open(f"runs/theta_spread_{seq}_{k}.json", "w"), indent=1)
for l in (0, 1, 2, 5, 10, 15, 20, 25, 29):
    print(l, {b: {kk: round(v, 2) for kk, v in e.items()} for b, e in out[l].items()})
