"""Convert a local checkpoint folder into a self-contained Dynamic-LLaVA folder, then load it back and show a summary.

    # official Dynamic-LLaVA checkpoint (LLaVA-1.5 layout, nested sparse_config); CLIP from mm_vision_tower or:
    python examples/convert_checkpoint.py original path/to/dynamic-llava-7b out/dynamic-llava-7b \
        --vision-tower path/to/clip-vit-large-patch14-336 --dtype bfloat16

    # transformers Llava checkpoint (e.g. a download of llava-hf/llava-1.5-7b-hf): predictors start untrained
    python examples/convert_checkpoint.py llava-hf path/to/llava-1.5-7b-hf out/dynamic-llava-init \
        --vision-keep-rate 0.2

    # try it without any download: the tiny official-format reference checkpoint
    python examples/convert_checkpoint.py original ../shared/reference/original_tiny/checkpoint /tmp/tiny-dynamic-llava

Same as `dynamic-llava convert ...`; this script calls the Python API (`dynamic_llava_hf.convert_original_checkpoint`,
`dynamic_llava_hf.convert_llava_hf_checkpoint`). DST is never overwritten without --force.
"""

import argparse
import os

from transformers import AutoModelForImageTextToText

from dynamic_llava_hf import convert_llava_hf_checkpoint, convert_original_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=("original", "llava-hf"), help="what SRC is")
    parser.add_argument("src", help="source checkpoint folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--vision-tower", help="CLIP folder for an official checkpoint (default: mm_vision_tower)")
    parser.add_argument("--dtype", help="cast the weights: a torch dtype name (bfloat16, float16, ...) or auto (keep)")
    parser.add_argument("--vision-keep-rate", type=float, help="share of image tokens kept at prefill")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args()

    overrides = {} if args.vision_keep_rate is None else {"vision_keep_rate": args.vision_keep_rate}
    if args.source == "original":
        result = convert_original_checkpoint(
            args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype, force=args.force, **overrides
        )
    else:
        result = convert_llava_hf_checkpoint(args.src, args.dst, dtype=args.dtype, force=args.force, **overrides)

    print(f"\nwrote {result.dst}: {result.num_tensors} tensors (verified)")
    print("files:", ", ".join(sorted(os.listdir(result.dst))))
    if result.special_tokens is not None:
        print(f"<image> = {result.special_tokens.image_token_id}, <pad> = {result.special_tokens.pad_token_id}")
    if result.new_keys:
        count = len(result.new_keys)
        print(f"{count} freshly initialised predictor tensors: not used until trained (predictors_trained)")

    # The folder loads with plain transformers (the remote code ships inside it).
    model = AutoModelForImageTextToText.from_pretrained(result.dst, trust_remote_code=True)
    config = model.config
    print(
        f"loaded {type(model).__name__}: sparse_layer={config.sparse_layer}, "
        f"{int(config.image_seq_length * config.vision_keep_rate)} of {config.image_seq_length} image tokens kept, "
        f"output-text predictor {'on' if config.use_output_text_predictor else 'off'}"
    )


if __name__ == "__main__":
    main()
