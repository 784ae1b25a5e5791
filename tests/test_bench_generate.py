"""python -m condensa.eval.bench generate at CPU size: its correctness check runs and can fail, and
every timed row carries the numbers its table reports (the timings themselves mean nothing here)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from condensa.eval.bench import generation as bench

TINY = ["--shape", "llama-tiny", "--batches", "[1]", "--prompt_lens", "[128]", "--new_tokens", "9",
        "--calibration_len", "128", "--calibration_blocks", "1", "--check_len", "64", "--check_steps", "6",
        "--block", "32", "--k", "8", "--tile_budget", "0.25", "--dtype", "float32", "--repeats", "3", "--warmup", "1"]


def test_the_benchmark_checks_then_times_dense_and_the_sparse_rule(tmp_path, capsys):
    assert bench.main([*TINY, "--out_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["rule"] for r in results] == ["dense", "gate f=0.25 + Top-θ k=8"]
    for r in results:
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["forward_s"] > 0 and np.isfinite(r["tokens_per_s"])
    assert "| dense | 1 | 128 |" in (tmp_path / "summary.md").read_text()
    checks = json.loads((tmp_path / "results.json").read_text())["checks"]
    for c in checks.values():  # float32 on the CPU: the paths agree up to rounding
        assert c["steps"] == 6 and c["worst_logit_gap"] <= 1e-4 and c["argmax_agreement"] == 1.0
        assert c["max_logit_difference"] <= 1e-4


def test_the_check_refuses_tokens_that_differ_from_an_independent_path(monkeypatch):
    import condensa
    from condensa.attention import AttentionConfig

    cfg = bench.GenerateBenchConfig(shape="llama-tiny", prompt_lens=[128], check_len=16, check_steps=4, block=32,
                                    dtype="float32")
    model = bench.build_model(cfg, 64)
    real = condensa.generate

    def off_by_one(*args, **kwargs):  # the timed path made wrong on purpose: its last token
        out = real(*args, **kwargs)
        return np.where(np.arange(out.shape[1]) == out.shape[1] - 1, out + 1, out)

    monkeypatch.setattr(condensa, "generate", off_by_one)
    with pytest.raises(RuntimeError, match="below an independent path"):
        bench.check(model, AttentionConfig(), None, cfg)


def test_the_check_compares_a_wrong_decode_kernel_with_the_reference_ops(monkeypatch):
    """The sparse rule's independent path is the reference backend: a decode kernel made wrong on
    purpose (its output scaled by 5%) is refused, which comparing the kernel with itself would not."""
    from condensa.attention import pallas_backend

    cfg = bench.GenerateBenchConfig(shape="llama-tiny", prompt_lens=[128], check_len=64, check_steps=6, block=32,
                                    k=8, tile_budget=0.25, calibration_len=128, calibration_blocks=1, dtype="float32")
    model = bench.build_model(cfg, 128)
    _, (gated, thresholds) = bench.rules(cfg, model).values()
    bench.check(model, gated, thresholds, cfg)  # the real kernels pass
    real = pallas_backend._decode
    monkeypatch.setattr(pallas_backend, "_decode", lambda *args, **kwargs: real(*args, **kwargs) * 1.05)
    jax.clear_caches()  # generate's compiled loop would keep the real kernel
    with pytest.raises(RuntimeError, match="differ from an independent path's by up to"):
        bench.check(model, gated, thresholds, cfg)


@pytest.mark.parametrize("args,match", [(["--shape", "gpt2"], "unknown shape"), (["--new_tokens", "1"], "at least 2")])
def test_bad_options_are_one_line_errors(args, match, capsys, tmp_path):
    assert bench.main([*args, "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
