"""Peak memory of one training step (forward + backward): Dynamic-LLaVA's masked-softmax path vs plain attention.

The training forward keeps every token and applies the sampled keep masks as an additive float mask in the layers
`>= sparse_layer`; layers below it run the backend's normal causal kernel. This script measures what that costs
against the same model with sparsification off (the standard causal sdpa forward), each in a fresh process.

    python examples/training_memory.py --hidden-size 256 --layers 8 --batch-size 2 --text-tokens 64

On CUDA it reports `torch.cuda.max_memory_allocated` over a step after a warm-up step; on CPU the growth of the
process's peak resident memory during the first step (no warm-up: the C allocator keeps freed memory resident, so a
second step would hide its peak).
"""

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import CLIPVisionConfig, LlamaConfig


def build_model(args):
    from dynamic_llava_hf import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration

    config = DynamicLlavaConfig(
        text_config=LlamaConfig(
            vocab_size=1000,
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 11008 // 4096,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
        ),
        image_token_index=999,
        image_seq_length=576,
        output_text_len_for_training=8,
    )
    config._attn_implementation = args.attn_implementation
    return DynamicLlavaForConditionalGeneration(config)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(args) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args).to(device).train()
    text = torch.randint(3, 998, (args.batch_size, args.text_tokens), device=device)
    image = torch.full((args.batch_size, 576), 999, device=device)
    input_ids = torch.cat([text[:, :8], image, text[:, 8:]], dim=1)
    labels = input_ids.masked_fill(input_ids == 999, -100)
    labels[:, : 8 + 576 + 8] = -100
    pixel_values = torch.randn(args.batch_size, 3, 336, 336, device=device)
    batch = dict(input_ids=input_ids, pixel_values=pixel_values, labels=labels, sparsity=args.mode == "dynamic")

    if device.type == "cuda":
        model(**batch).loss.backward()  # warm-up: lazy initialisation, cuBLAS workspaces
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    model(**batch).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"mode": args.mode, "device": device.type, "sequence": input_ids.shape[1], "step_peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--mode", choices=["dynamic", "plain"], help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return

    results = {}
    for mode in ("plain", "dynamic"):  # fresh processes: peak memory does not carry over
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        results[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    plain, dynamic = results["plain"]["step_peak_bytes"], results["dynamic"]["step_peak_bytes"]
    print(
        f"device {results['plain']['device']}, sequence {results['plain']['sequence']} tokens, "
        f"batch {args.batch_size}, {args.layers} layers (sparse from layer 2), width {args.hidden_size}"
    )
    print(
        f"training step peak, sparsification off (plain causal {args.attn_implementation}): {plain / 2**20:8.1f} MiB"
    )
    print(f"training step peak, Dynamic-LLaVA masked softmax:                  {dynamic / 2**20:8.1f} MiB")
    print(f"ratio: {dynamic / plain:.2f}")


if __name__ == "__main__":
    main()
