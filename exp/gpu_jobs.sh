#!/usr/bin/env bash
# The GPU jobs of one device session, each sized to fit one call (600 s), results under $OUT.
# Run after `bash exp/device_steps.sh first|second` where a job needs the GGUF (see that file).
#
#   bash exp/gpu_jobs.sh generate-small   # issue 25: SmolLM2 shape at 8k, 1B shape at batch 8 x 32k
#   bash exp/gpu_jobs.sh generate-long    # issue 25: 1B shape at batch 8 x 64k, batch 1 x 128k (chunked)
#   bash exp/gpu_jobs.sh determinism      # issue 23: which op makes training non-deterministic
#   bash exp/gpu_jobs.sh determinism-processes  # issue 23: the same gradients in two processes?
#   bash exp/gpu_jobs.sh condense-topk    # issue 23: top-k loss at λ = 0.3 and 3 (needs the GGUF in /tmp)
set -uo pipefail
export PYTHONPATH=/tmp/site:.:exp
bench() { timeout "$1" python -m condensa.eval.bench generate "${@:2}"; echo "rc=$? for generate ${*:2}"; }
case "${1:-}" in
  generate-small)
    bench 200 --shape smollm2-135m --batches [1,8] --prompt_lens [8192] --repeats 2 --out_dir "$OUT/gen-smollm2-8k"
    bench 330 --shape llama-1b --batches [8] --prompt_lens [32768] --repeats 2 --out_dir "$OUT/gen-1b-32k" ;;
  generate-long)
    bench 300 --shape llama-1b --batches [8] --prompt_lens [65536] --repeats 2 --out_dir "$OUT/gen-1b-64k"
    bench 250 --shape llama-1b --batches [1] --prompt_lens [131072] --prefill_chunk 16384 --repeats 2 \
      --out_dir "$OUT/gen-1b-128k" ;;
  determinism)
    # two processes with the default flags (autotuning chooses anew in each), then XLA's switch
    for run in a b; do timeout 100 python exp/grad_determinism.py --out "$OUT/grad-determinism-$run.json"; done
    XLA_FLAGS=--xla_gpu_exclude_nondeterministic_ops=true timeout 100 python exp/grad_determinism.py \
      --repeats 2 --out "$OUT/grad-determinism-excluded.json" ;;
  determinism-processes)
    # XLA attention under the switch was deterministic within a process; across two processes too,
    # with autotuning off (it may choose other kernels in each process)?
    for flags in "--xla_gpu_exclude_nondeterministic_ops=true" \
                 "--xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_autotune_level=0"; do
      for run in a b; do
        XLA_FLAGS="$flags" timeout 60 python exp/grad_determinism.py --repeats 1 --cases "topk k=64/xla attention" \
          --out "$OUT/grad-determinism-$run-$(echo "$flags" | wc -w).json"
      done
    done ;;
  condense-topk)
    # the earlier runs' results, so the report has every row; topk-3.0 was trained but never evaluated
    # and its checkpoint is gone with that machine, so it trains again
    mkdir -p /tmp/condense2 && python -c "import json; d = json.load(open('docs/runs/real-model/condense-smollm2-h100.json')); \
d['train'].pop('topk-3.0-s0', None); json.dump(d, open('/tmp/condense2/results.json', 'w'))"
    timeout 540 python exp/condense_real.py --model /tmp/smollm2.gguf --train_data /tmp/data/misc \
      --data /tmp/data/wiki.test.raw --book /tmp/data/gutenberg/melville-moby_dick.txt \
      --runs topk:3.0,topk:0.3 --steps 200 --runs_dir /tmp/condense2 --out "$OUT/condense" ;;
  *)
    echo "usage: bash exp/gpu_jobs.sh generate-small|generate-long|determinism|determinism-processes|condense-topk" >&2; exit 2 ;;
esac
