"""The real-data study (`python -m condensa.eval.study`): pretrain a stand-in GPT-2 on the corpus,
fine-tune it with the concentration losses, calibrate Top-θ and the tile gate, evaluate on
held-out corpus text and WikiText-2, and time the kernels. Each stage writes JSON; the report
(`docs/results.md`) is generated from that JSON only.
"""
