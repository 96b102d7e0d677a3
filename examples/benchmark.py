"""Dynamic-LLaVA against transformers' Llava with the same random weights: prefill, decoding, KV memory, FLOPs.

A thin wrapper around `dynamic-llava bench` (`dynamic_llava_hf.bench`); every option of the command works here.

    # the README's CPU table (31 minutes on the 2-core CPU)
    python examples/benchmark.py --preset cpu-7b-topology --output bench-cpu-7b-topology.json \
        --plot bench-cpu-7b-topology.png

    # a shorter CPU run: batch 1 and 8 only, 256 new tokens, no sweep
    python examples/benchmark.py --preset cpu-7b-topology --decode-batch-sizes 1 8 --new-tokens 256 \
        --sweep-keep-rates

    # real LLaVA-1.5 shapes on a GPU (bf16; 256, 1K and 4K new tokens)
    python examples/benchmark.py --preset llava-1.5-7b --device cuda

    # the analytic FLOPs of the real shapes, on any machine (no weights are built)
    python examples/benchmark.py --preset llava-1.5-13b --analytic-only
"""

import sys

from dynamic_llava_hf_cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
