"""Writes notebooks/quickstart_gpu.ipynb and notebooks/tpu.ipynb (outputs stripped).

    python notebooks/build.py

The notebooks are generated so that the steps they share (setup, loading the model, reading text,
calibration, perplexity, export) are written once. Edit the cells here, then run this script;
tests/test_notebooks.py executes both notebooks at tiny size (CONDENSA_NOTEBOOK_TINY=1) and checks
that the files on disk carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# ---- cells both notebooks share ------------------------------------------------------------------

SETUP = '''\
import os
import tempfile
import time
from pathlib import Path

# CONDENSA_NOTEBOOK_TINY=1 (CI) shrinks everything: a tiny random GPT-2, a few hundred tokens, a few steps, on CPU.
TINY = os.environ.get("CONDENSA_NOTEBOOK_TINY") == "1"
if TINY:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
{extra_env}
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "condensa").is_dir()), Path.cwd())
SHARED = ROOT.parent / "shared" / "data"  # the project's shared data, when it sits beside the checkout
WORK = Path(tempfile.mkdtemp(prefix="condensa-notebook-")) if TINY else ROOT / "runs" / "{name}"
WORK.mkdir(parents=True, exist_ok=True)

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import condensa
from condensa import AttentionConfig
from condensa.data import load_tokenizer, pack_blocks

%matplotlib inline
print(f"JAX {{jax.__version__}} on {{jax.default_backend()}}: {{jax.devices()}}; tiny={{TINY}}; work folder {{WORK}}")'''

SIZES = '''\
if TINY:
    T, K, TILE, BUDGET = 128, 16, 16, 0.25  # context, kept keys per row, gate tile, gate budget f
    CAL_BLOCKS, EVAL_TOKENS = 4, 512  # calibration blocks of T tokens, evaluation tokens
    STEPS, BATCH, SEQ = 4, {tiny_batch}, 64  # fine-tuning steps, batch, sequence length
else:
    T, K, TILE, BUDGET = 1024, 64, 64, 0.25
    CAL_BLOCKS, EVAL_TOKENS = 64, 32768
    STEPS, BATCH, SEQ = 300, {full_batch}, 1024'''

LOAD_MODEL = '''\
if TINY:
    # A tiny random GPT-2 (one layer, head_dim = 128 / 2 = 64, a size the Pallas kernels take),
    # saved like any Hugging Face model.
    import shutil

    from flax import nnx

    tiny = condensa.GPT2Config(n_embd=128, n_layer=1, n_head=2, n_positions=T)
    MODEL = str(condensa.save_pretrained(condensa.GPT2(tiny, rngs=nnx.Rngs(0)), tiny, WORK / "tiny-gpt2"))
    shutil.copytree(SHARED / "gpt2-tokenizer", MODEL, dirs_exist_ok=True)  # GPT-2's tokenizer files
else:
    MODEL = os.environ.get("CONDENSA_MODEL", "gpt2")  # a hub id, or a local HF directory when offline

model, config = condensa.load_pretrained(MODEL)
tokenizer = load_tokenizer(MODEL)
print(f"{{MODEL}}: {{config.n_layer}} layers, {{config.n_head}} heads of {{config.head_dim}}, context {{config.n_positions}}")'''

TEXT = '''\
if (SHARED / "corpus").is_dir():
    TRAIN_SOURCE = str(SHARED / "corpus")  # a folder of .txt files, as python -m condensa.train takes it
    train_text = (SHARED / "corpus" / "misc" / "inaugural.txt").read_text()
    eval_text = (SHARED / "wikitext-2-raw" / "wiki.test.raw").read_text()
else:  # no shared data beside the checkout: WikiText-2 from the Hugging Face hub
    from condensa.data import read_hf_dataset

    TRAIN_SOURCE = "wikitext:wikitext-2-raw-v1"  # an HF dataset name:config
    train_text = "\\n\\n".join(read_hf_dataset(TRAIN_SOURCE, split="train")[:5000])
    eval_text = "\\n\\n".join(read_hf_dataset(TRAIN_SOURCE, split="test"))
if TINY:  # fine-tune on a few hundred tokens of the corpus
    TRAIN_SOURCE = str(WORK / "train.txt")
    Path(TRAIN_SOURCE).write_text(train_text[:6000])

train_ids = np.asarray(tokenizer(train_text[: 8 * CAL_BLOCKS * T], verbose=False)["input_ids"])
eval_ids = np.asarray(tokenizer(eval_text[: 8 * EVAL_TOKENS], verbose=False)["input_ids"][:EVAL_TOKENS])
blocks = pack_blocks(train_ids, T)[:CAL_BLOCKS]  # [CAL_BLOCKS, T] calibration blocks
sample = jnp.asarray(eval_ids[:T])[None]  # one block of evaluation text
print(f"{{len(eval_ids)}} evaluation tokens, {{len(blocks)}} calibration blocks of {{T}}; fine-tuning text: {{TRAIN_SOURCE}}")'''

CALIBRATE = '''\
from condensa.sparsity.calibration import GateSpec, calibrate

start = time.perf_counter()
thresholds = calibrate(model, blocks, k=K, gate=GateSpec(block_q=TILE, block_k=TILE, tile_budget=BUDGET))
print(f"calibrated θ {{tuple(thresholds.theta.shape)}} and the gate Θ {{tuple(thresholds.tile_theta.shape)}} "
      f"on {{len(blocks)}} blocks in {{time.perf_counter() - start:.1f}} s")'''

RULES = '''\
topk = AttentionConfig(mode="topk", k=K)
toptheta = AttentionConfig(mode="toptheta", k=K)
gated = AttentionConfig(mode="toptheta", k=K, tile_gate=True, block_q=TILE, block_k=TILE, tile_budget=BUDGET)
RULES = {"dense": (AttentionConfig(), None), f"top-k (k={K})": (topk, None),
         f"Top-θ (k={K})": (toptheta, thresholds), f"gate f={BUDGET} + Top-θ": (gated, thresholds)}'''

TPU_RULES = '''\
gated = AttentionConfig(mode="toptheta", k=K, tile_gate=True, block_q=TILE, block_k=TILE, tile_budget=BUDGET,
                        backend=BACKEND)
RULES = {"dense": (AttentionConfig(backend=BACKEND), None), f"gate f={BUDGET} + Top-θ": (gated, thresholds)}'''

PERPLEXITY = '''\
from condensa.eval.perplexity import perplexity
from condensa.sparsity.metrics import sparsity_report


def compare(model, rules, ids, label):
    """Perplexity and kept attention of each rule on the same tokens, as a table."""
    rows = {{}}
    for name, (attention, th) in rules.items():
        ppl = perplexity(model, ids, max_length=T, attention=attention, thresholds=th)["ppl"]
        kept = sparsity_report(model, sample, attention=attention, thresholds=th)["mean"]["kept_fraction"]
        rows[name] = (ppl, kept)
    dense = rows["dense"][0]
    print(f"{{label}}: perplexity on {{len(ids)}} tokens")
    for name, (ppl, kept) in rows.items():
        print(f"  {{name:24s}} ppl {{ppl:9.3f}} ({{ppl / dense - 1:+7.2%}})   kept attention {{kept:6.1%}}")
    return rows


before = compare(model, RULES, eval_ids, "base model")'''

EXPORT = '''\
from condensa.export import ExportConfig, export
from condensa.sparsity import Thresholds

try:
    import torch  # noqa: F401  (--verify reloads the export in transformers, which needs PyTorch)
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

th_file = tuned_thresholds.save(WORK / "thresholds.safetensors")
record = export(ExportConfig(run=str(WORK / "finetune"), out=str(WORK / "export"), thresholds=str(th_file),
                             verify=HAVE_TORCH))
print(sorted(p.name for p in (WORK / "export").iterdir()))'''

LOAD_BACK = '''\
exported, _ = condensa.load_pretrained(WORK / "export")
exported_th = Thresholds.load(WORK / "export" / "thresholds.safetensors").validate_for(exported.config, gated)
prompt = jnp.asarray(tokenizer("The President said that")["input_ids"])[None]
sparse_decode = gated.replace(sdc="calibrated", vmc=True, backend=BACKEND)
for name, (attention, th) in {{"dense": (AttentionConfig(), None), "gate + Top-θ": (sparse_decode, exported_th)}}.items():
    start = time.perf_counter()
    tokens = condensa.generate(exported, prompt, 8 if TINY else 32, attention=attention, thresholds=th)
    print(f"{{name:14s}} {{time.perf_counter() - start:5.1f}} s", repr(tokenizer.decode(np.asarray(tokens[0]))))'''


def finetune(mesh_note: str, dtype: str) -> str:
    return f'''\
from condensa.train import TrainConfig, train
from condensa.train.config import CheckpointConfig, DataConfig, LossConfig, OptimizerConfig, TopkLoss, TrainLoopConfig

run = TrainConfig(
    out=str(WORK / "finetune"), model=MODEL, init="pretrained", dropout=0.0,
    data=DataConfig(source=TRAIN_SOURCE, tokenizer=MODEL, seq_len=SEQ, cache_dir=str(WORK / "tokens"),
                    validation_fraction=0.05),
    optimizer=OptimizerConfig(lr=1e-4, warmup_steps=min(50, STEPS // 4)),
    loss=LossConfig(topk=TopkLoss(weight=0.5, k=K), tile_size=TILE),  # the top-k concentration loss
    train=TrainLoopConfig(steps=STEPS, batch_size=BATCH, remat=not TINY, dtype="float32" if TINY else "{dtype}",
                          eval_every=STEPS, eval_batches=0 if TINY else 8, log_every=1),
    checkpoint=CheckpointConfig(every=STEPS),
){mesh_note}
final = train(run)  # the same loop as `python -m condensa.train`: metrics.jsonl, orbax checkpoints, hf/
print("validation:", {{k: round(v, 4) for k, v in final.items()}} or "off at tiny size")'''


PLOT_TRAINING = '''\
import json

log = [json.loads(line) for line in (WORK / "finetune" / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in log if r["kind"] == "train"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot([r["step"] for r in steps], [r["lm_loss"] for r in steps])
axes[0].set(xlabel="step", ylabel="LM loss", title="language-model loss")
axes[1].plot([r["step"] for r in steps], [r["L_conc"] for r in steps], color="tab:orange")
axes[1].set(xlabel="step", ylabel="1 - top-k mass", title=f"concentration loss (k={K})")
plt.tight_layout()
plt.show()'''

RECALIBRATE = '''\
tuned, _ = condensa.load_pretrained(WORK / "finetune" / "hf")
tuned_thresholds = calibrate(tuned, blocks, k=K, gate=GateSpec(block_q=TILE, block_k=TILE, tile_budget=BUDGET))
tuned_rules = {{name: (attention, None if th is None else tuned_thresholds) for name, (attention, th) in RULES.items()}}
after = compare(tuned, tuned_rules, eval_ids, "fine-tuned model")'''


# ---- the quickstart (GPU) notebook ---------------------------------------------------------------

ATTENTION_MAPS = '''\
from flax import nnx

# One compiled forward pass (called eagerly, every op would compile on its own).
forward = nnx.jit(lambda model, ids: model(ids, return_attention=True))
out = forward(model, sample)  # logits, and the attention probabilities [B, H, T, T] of each layer
layer, head = config.n_layer // 2, 0
p = np.asarray(out.attentions[layer][0, head], np.float64)

# top-k mass: the share of each row's probability held by its k largest entries (rows longer than k)
ordered = -np.sort(-np.stack([np.asarray(a[0]) for a in out.attentions]), axis=-1)  # [L, H, T, T], largest first
cumulative = np.cumsum(ordered, axis=-1)
ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < T]
mass = {k: cumulative[:, :, k:, k - 1].mean(axis=(1, 2)) for k in ks}  # rows i >= k have n = i + 1 > k

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
image = axes[0].imshow(np.log10(np.maximum(p, 1e-6)), cmap="viridis", vmin=-6, vmax=0)
axes[0].set(title=f"attention, layer {layer} head {head} (log10 p)", xlabel="key", ylabel="query")
fig.colorbar(image, ax=axes[0], shrink=0.8)
for l in range(config.n_layer):
    axes[1].plot(ks, [mass[k][l] for k in ks], marker="o", label=f"layer {l}")
axes[1].set(xscale="log", xlabel="k", ylabel="mean top-k mass", title="how much of each row k keys hold")
axes[1].axvline(K, color="gray", linestyle="--", linewidth=1)
axes[1].legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
print(f"top-{K} mass, mean over layers: {np.mean(mass[K]) if K in mass else float('nan'):.3f}")'''

KERNELS = '''\
BACKEND = "pallas"  # the Pallas kernels: Triton on NVIDIA GPUs, interpret mode (exact, slow) on CPU
sparse = gated.replace(sdc="calibrated", vmc=True)
logits = nnx.jit(lambda model, ids, th, attention: model(ids, attention=attention, thresholds=th).logits,
                 static_argnames="attention")
reference = logits(model, sample, thresholds, attention=sparse)
kernel = logits(model, sample, thresholds, attention=sparse.replace(backend=BACKEND))
print(f"Pallas prefill kernel vs the reference op: max |Δ logits| = {float(jnp.abs(kernel - reference).max()):.2e}")'''

TIMING = '''\
if jax.default_backend() != "gpu":
    print(f"timing skipped: JAX runs on {jax.default_backend()!r}; Pallas runs in interpret mode there and "
          "cuDNN needs an NVIDIA GPU. Run this notebook on a GPU runtime to time the kernels.")
else:
    # One attention layer at long context, bf16, with the positional structure of trained models
    # (condensa.eval.bench.prefill.structured_qkv); thresholds from exact top-k rows of these inputs.
    from condensa.eval.bench.prefill import row_thresholds, structured_qkv, tile_thresholds
    from condensa.eval.bench.timing import measure
    from condensa.kernels import toptheta_prefill

    for length in (2048, 8192):
        q, k, v = structured_qkv(jax.random.key(0), 1, length, 12, 64, jnp.bfloat16)
        scale = 64 ** -0.5
        theta, _ = row_thresholds(q, k, scale, 64)
        tile_theta = tile_thresholds(q, k, scale, 0.125, 128, 128)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                    implementation="cudnn"))
        runs = {
            "cuDNN (dense)": lambda: cudnn(q, k, v),
            "Pallas dense": lambda: toptheta_prefill(q, k, v, scale=scale)[0],
            "Pallas gate f=0.125 + Top-θ": lambda: toptheta_prefill(q, k, v, scale=scale, theta=theta,
                                                                    tile_theta=tile_theta, tile_budget=0.125)[0],
        }
        times = {name: measure(fn, warmup=3, repeats=20)["median_s"] * 1e3 for name, fn in runs.items()}
        base = times["cuDNN (dense)"]
        for name, ms in times.items():
            print(f"T={length:5d}  {name:28s} {ms:7.3f} ms  ({base / ms:4.2f}x cuDNN)")'''


def quickstart() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return _notebook([
        md("# condensa quickstart (GPU)\n\n"
           "Sparse attention for GPT-2 in JAX, end to end: look at how concentrated GPT-2's attention already "
           "is, calibrate **Top-θ** thresholds and a **tile gate**, compare perplexity under dense, top-k and "
           "Top-θ attention, run the **Pallas kernels** and time them against cuDNN, fine-tune briefly with the "
           "**concentration loss**, and export the result as a Hugging Face model.\n\n"
           "Run it on a GPU runtime from a checkout of condensa (`pip install -e \".[gpu,dev]\"`). "
           "Without network access set `CONDENSA_MODEL` to a local GPT-2 directory. "
           "`CONDENSA_NOTEBOOK_TINY=1` runs the same cells on a tiny random model on CPU in about a minute "
           "(that is how CI runs it)."),
        code(SETUP.format(extra_env="", name="notebook-quickstart")),
        code(SIZES.format(tiny_batch=4, full_batch=8)),
        md("## 1. Load GPT-2\n\n`condensa.load_pretrained` takes a hub id or a local Hugging Face directory and "
           "returns a Flax NNX model with float32 parameters."),
        code(LOAD_MODEL.format()),
        code(TEXT.format()),
        md("## 2. How sparse is GPT-2's attention?\n\nOne head's attention map on real text, and the *top-k mass*: "
           "the share of each row's probability that its k largest entries hold. When a few keys hold most "
           "of the mass, the rest can be dropped. (The tiny CI model is random, so its maps are flat.)"),
        code(ATTENTION_MAPS),
        md("## 3. Calibrate Top-θ\n\nTop-θ replaces the top-k search by a per-row threshold θ[layer, head, row "
           "length], calibrated so that `score > θ` keeps about k keys per row. The tile gate adds a threshold "
           "on cheap mean-pooled tile scores, so whole tiles of the attention matrix can be skipped "
           "(`python -m condensa.calibrate` does the same from the command line)."),
        code(CALIBRATE.format()),
        md("## 4. Perplexity: dense vs top-k vs Top-θ\n\nThe Hugging Face sliding-window protocol "
           "(`condensa.eval.perplexity`), and the kept fraction of attention elements of each rule."),
        code(RULES),
        code(PERPLEXITY.format()),
        md("## 5. The Pallas kernels, and their speed against cuDNN\n\n`AttentionConfig(backend=\"pallas\")` "
           "runs the Top-θ prefill kernel, which skips the tiles the gate drops and the elements under θ. It "
           "gives the reference op's numbers (to ~1e-6 on a CPU; on a GPU both sides use TF32 matmuls, which move "
           "logits by ~1e-2). On a GPU the next cell times it against "
           "`jax.nn.dot_product_attention(implementation=\"cudnn\")`."),
        code(KERNELS),
        code(TIMING),
        md("## 6. Fine-tune with the concentration loss\n\nThe training API behind `python -m condensa.train`: "
           "a `TrainConfig` with a top-k concentration loss (λ = 0.5), trained from the loaded model. Then "
           "recalibrate on the fine-tuned model and compare again."),
        code(finetune("", "bfloat16")),
        code(PLOT_TRAINING),
        code(RECALIBRATE.format()),
        md("## 7. Export to Hugging Face and load it back\n\n`condensa.export` (the API of "
           "`python -m condensa.export`) reads the run's newest checkpoint, writes config.json + "
           "model.safetensors + the tokenizer with the thresholds beside them, and with `verify` checks the "
           "logits in transformers. Then generate with the KV cache: dense, and gate + Top-θ with the decode "
           "kernel."),
        code(EXPORT.format()),
        code(LOAD_BACK.format()),
    ])


# ---- the TPU notebook ----------------------------------------------------------------------------

TPU_DEVICES = '''\
from condensa.kernels import resolve_backend

print(f"{jax.device_count()} devices ({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")
# The Pallas kernels are compiled for GPUs (Triton); on CPU they only run in interpret mode (exact but
# slow, for tests), and a Mosaic TPU variant is not written yet. Elsewhere the reference ops run:
# the same numbers, compiled by XLA.
try:
    BACKEND = "pallas" if resolve_backend() != "interpret" else "reference"
except condensa.CondensaError as err:
    BACKEND = "reference"
    print(f"no Pallas kernel for {jax.default_backend()!r} yet: {err}")
print(f"attention backend: {BACKEND}")'''

TPU_MESH = '''
# Data parallel over every device: TrainConfig.mesh.data = 0 (the default) puts all of them on the
# `data` axis; each batch is split across them and the gradients are averaged by XLA.
print(f"training on a {jax.device_count()}-device data mesh, {BATCH // jax.device_count()} sequences per device")'''


def tpu() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    extra_env = ('    # two CPU "devices", so the data-parallel path below runs as it does over TPU cores\n'
                 '    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):\n'
                 '        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()')
    return _notebook([
        md("# condensa on TPU\n\n"
           "The quickstart's path on a TPU runtime: load GPT-2, calibrate Top-θ and the tile gate, compare "
           "perplexity, run sparse attention with the kernel backend chosen for the platform, fine-tune with "
           "the concentration loss **data parallel over all TPU cores**, and export to Hugging Face.\n\n"
           "Install condensa with the TPU build of JAX (`pip install -e \".[tpu]\"`). A single TPU VM (e.g. v5e-8) "
           "needs nothing else. On a multi-host pod slice, run the same code as a script on every host and call "
           "`jax.distributed.initialize()` before anything else (what `CONDENSA_DISTRIBUTED=1` does for "
           "`python -m condensa.train`). `CONDENSA_NOTEBOOK_TINY=1` runs it on CPU with a tiny random model and "
           "two simulated devices."),
        code(SETUP.format(extra_env=extra_env, name="notebook-tpu")),
        code(SIZES.format(tiny_batch="4 * jax.device_count()", full_batch="8 * jax.device_count()")),
        md("## 1. Devices and the kernel backend"),
        code(TPU_DEVICES),
        md("## 2. Load GPT-2 and text"),
        code(LOAD_MODEL.format()),
        code(TEXT.format()),
        md("## 3. Calibrate Top-θ and the tile gate, compare perplexity"),
        code(CALIBRATE.format()),
        code(TPU_RULES),
        code(PERPLEXITY.format()),
        md("## 4. Data-parallel fine-tuning with the concentration loss"),
        code(finetune(TPU_MESH, "bfloat16")),
        code(PLOT_TRAINING),
        code(RECALIBRATE.format()),
        md("## 5. Export to Hugging Face and load it back"),
        code(EXPORT.format()),
        code(LOAD_BACK.format()),
    ])


def _notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged notebook changes nothing
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


NOTEBOOKS = {"quickstart_gpu.ipynb": quickstart, "tpu.ipynb": tpu}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = build()
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
