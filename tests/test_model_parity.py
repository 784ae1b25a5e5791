"""condensa's GPT-2 against transformers' eager GPT2LMHeadModel (PyTorch, CPU, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import condensa
from tests.conftest import make_hf_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Attention is all you need, they said.",
]


def _batch(tokenizer, vocab_size):
    """Two real sentences, right-padded. Ids are folded into small vocabularies (tiny shape only)."""
    enc = [tokenizer(s)["input_ids"] for s in SENTENCES]
    length = max(map(len, enc))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for row, e in enumerate(enc):
        ids[row, : len(e)] = np.asarray(e) % vocab_size
        mask[row, : len(e)] = 1
    return ids, mask


def _hf_forward(hf, ids, mask):
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
    return out.logits.numpy(), [a.numpy() for a in out.attentions]


SHAPES = {
    "tiny": dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt2-small-width": dict(vocab_size=50257, n_embd=768, n_layer=2, n_head=12, n_positions=128,
                             bos_token_id=50256, eos_token_id=50256),
    "inverse-layer-scaling": dict(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                  scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_attention_match_transformers(shape, tokenizer, tmp_path):
    hf = make_hf_model(seed=1, **SHAPES[shape])
    hf.save_pretrained(tmp_path)
    model, config = condensa.load_pretrained(tmp_path)
    assert config.n_embd == SHAPES[shape]["n_embd"]

    ids, mask = _batch(tokenizer, config.vocab_size)
    hf_logits, hf_attn = _hf_forward(hf, ids, mask)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_attention=True)

    valid = mask.astype(bool)  # padded query rows are undefined in both implementations
    logits = np.asarray(out.logits)
    assert np.abs(logits[valid] - hf_logits[valid]).max() <= 1e-4
    assert len(out.attentions) == config.n_layer
    for ours, theirs in zip(out.attentions, hf_attn):
        ours = np.asarray(ours)
        for b in range(2):
            n = valid[b].sum()
            assert np.abs(ours[b, :, :n, :n] - theirs[b, :, :n, :n]).max() <= 1e-5


def test_jit_and_bf16_compute_stay_close_to_fp32(tiny_hf_dir):
    model32, _ = condensa.load_pretrained(tiny_hf_dir)
    model16, _ = condensa.load_pretrained(tiny_hf_dir, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 99, (2, 24)))

    from flax import nnx

    jitted = nnx.jit(lambda m, x: m(x).logits)
    eager = np.asarray(model32(ids).logits)
    np.testing.assert_allclose(np.asarray(jitted(model32, ids)), eager, atol=1e-5)
    # parameters stay float32; only the compute is bf16
    assert model16.wte.embedding.get_value().dtype == jnp.float32
    low = np.asarray(model16(ids).logits)
    assert low.dtype == np.float32
    assert np.abs(low - eager).max() < 0.05 * np.abs(eager).max() + 0.05


def test_dropout_is_active_in_train_mode_only(tiny_hf_dir):

    model, config = condensa.load_pretrained(tiny_hf_dir)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 99, (1, 16)))
    eval_a, eval_b = model(ids).logits, model(ids).logits
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    model.train()
    train_a, train_b = model(ids).logits, model(ids).logits  # the dropout rng stream advances
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(eval_a))


def test_remat_gives_the_same_logits_and_gradients(tiny_hf_dir):
    from flax import nnx

    plain, _ = condensa.load_pretrained(tiny_hf_dir)
    remat, _ = condensa.load_pretrained(tiny_hf_dir, remat=True)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 99, (2, 16)))

    def loss(m):
        return m(ids).logits.mean()

    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_pytorch_bin_checkpoints_load(tmp_path):
    hf = make_hf_model(seed=3)
    hf.config.save_pretrained(tmp_path)  # transformers 5 only writes safetensors: write the pickle by hand
    torch.save({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, tmp_path / "pytorch_model.bin")
    model, _ = condensa.load_pretrained(tmp_path)
    ids = np.random.RandomState(3).randint(0, 99, (1, 12))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - expected).max() <= 1e-4


def test_keys_without_transformer_prefix_load(tmp_path):
    """Older checkpoints (the original `gpt2` upload) name tensors `h.0...` without `transformer.`."""
    from safetensors.torch import save_file

    hf = make_hf_model(seed=4)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    hf.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    model, _ = condensa.load_pretrained(tmp_path)
    ids = np.random.RandomState(4).randint(0, 99, (1, 10))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - expected).max() <= 1e-4
