"""The reference for `python -m condensa.eval ppl --model smollm2-135m`: the same perplexity protocol
(non-overlapping windows of --max_length tokens over the first --max_tokens tokens of the text, every
token but each window's first scored) computed by transformers' own GGUF loader in PyTorch, float32,
on the CPU. docs/benchmarks.md compares the two.

    python exp/smollm2_ppl_transformers.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --max_length 2048 --max_tokens 16384
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from condensa.model.sources import named_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a text file")
    parser.add_argument("--max_length", type=int, default=2048, help="window length in tokens")
    parser.add_argument("--max_tokens", type=int, default=16384, help="evaluate the first N tokens")
    args = parser.parse_args()
    path = named_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tokenizer(open(args.data, encoding="utf-8").read())["input_ids"][: args.max_tokens]
    start, nll, count = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), args.max_length):
            window = torch.tensor([ids[begin: begin + args.max_length]])
            if window.shape[1] < 2:
                break
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    print(json.dumps({"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
                      "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
