"""Shared fixtures: tiny random GPT-2 models built with transformers, real text from ../shared/data."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' arrays are tiny, so their time goes to XLA compiling for the CPU, not to running what
# it compiled, and LLVM's cheap optimisation level compiles faster (commit 01e413f has the
# measurement). It changes how fast the compiled code runs, not what it computes.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
CORPUS_DIR = SHARED_DATA / "corpus"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def pytest_configure(config):
    """One XLA compilation cache for this session, shared by the xdist workers and every
    subprocess they start (they inherit the variables): many tests and CLI runs compile the same
    steps, and a hit loads the compiled step instead of compiling it again. A fresh folder per
    session, so every run compiles what it needs at least once, as a clean checkout would."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # a worker inherits the controller's; a cache the caller chose stays theirs
    folder = tempfile.mkdtemp(prefix="condensa-test-xla-cache-")
    config._condensa_xla_cache = folder
    os.environ.update(JAX_COMPILATION_CACHE_DIR=folder, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# The test files that take longest (tens of seconds each, measured on 2 cores), longest first. xdist
# hands out whole files (--dist loadfile) in collection order (--no-loadscope-reorder), so these start
# first and the short files fill in around them, instead of one long file running alone at the end.
SLOW_FILES = ("test_readme_examples.py", "test_kernels_prefill.py", "test_llama_sparse.py", "test_study.py",
              "test_train_errors.py", "test_notebooks.py", "test_loss_kernel.py", "test_gguf.py",
              "test_pallas_backend.py", "test_eval_sweep.py", "test_fault_injection.py", "test_selector_prepass.py",
              "test_model_parity.py", "test_kernels_decode.py", "test_calibrate.py", "test_bench_generate.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    folder = getattr(config, "_condensa_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def require_shared(path: Path) -> Path:
    """Skips the test with a clear reason when ../shared/data is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} is missing: put the shared data folder beside the checkout (../shared/data)")
    return path


def hf_tiny_config(**overrides):
    """A transformers GPT2Config for tests: eager attention so attention probabilities are returned."""
    from transformers import GPT2Config

    values = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=98,
                  eos_token_id=98, attn_implementation="eager")
    values.update(overrides)
    return GPT2Config(**values)


def make_hf_model(seed: int = 0, **overrides):
    """A randomly initialised `GPT2LMHeadModel` in eval mode (torch is a test-only dependency)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_tiny_config(**overrides)).eval()


@pytest.fixture(scope="session", autouse=True)
def token_cache_in_tmp(tmp_path_factory):
    """The default token cache (~/.cache/condensa) moves to this session's temporary folder, so the
    tests leave nothing in the user's home (subprocesses inherit it); runs in one session share it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONDENSA_CACHE_DIR", str(tmp_path_factory.mktemp("condensa-cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from condensa.data import load_tokenizer

    return load_tokenizer(require_shared(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A saved tiny random HF GPT-2 directory (vocab 99, 2 layers, 4 heads, n_positions 64)."""
    path = tmp_path_factory.mktemp("tiny_hf")
    make_hf_model().save_pretrained(path)
    return path
