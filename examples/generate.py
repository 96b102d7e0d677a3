"""Answer one question about one image with a Dynamic-LLaVA checkpoint and report what sparsification saved.

    python examples/generate.py path/to/dynamic-llava-7b --image cat.jpg --question "What is the cat doing?"

Only transformers' Auto classes are used, so the same lines work on any converted folder or Hub repository. With the
dynamic-llava-hf package installed they resolve to its classes; without it, pass `--trust-remote-code` to run the code
files saved next to the weights.
"""

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="converted Dynamic-LLaVA folder or Hub repository id")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", default="What is shown in this image?")
    parser.add_argument("--trust-remote-code", action="store_true", help="use the code files saved with the weights")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype as transformers takes it: auto (as saved), bfloat16, float16, ...",
    )
    parser.add_argument("--load-in", choices=["8bit", "4bit"], help="bitsandbytes weight quantisation of the decoder")
    parser.add_argument("--device-map", default=None, help='e.g. "auto" to spread the model over GPUs/CPU/disk')
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--vision-keep-rate", type=float, help="override the fraction of image tokens kept (config: 0.2)"
    )
    parser.add_argument("--dense", action="store_true", help="switch sparsification off (plain LLaVA-1.5)")
    return parser.parse_args(argv)


def load(args):
    if not args.trust_remote_code:
        try:
            import dynamic_llava_hf  # noqa: F401  (registers the Auto classes for model_type "dynamic_llava")
        except ImportError:
            raise SystemExit("dynamic-llava-hf is not installed: install it or pass --trust-remote-code") from None
    quantization_config = None
    if args.load_in is not None:
        quantization_config = BitsAndBytesConfig(
            load_in_8bit=args.load_in == "8bit", load_in_4bit=args.load_in == "4bit"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        args.model,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device_map=args.device_map,
        quantization_config=quantization_config,
    ).eval()
    if args.device_map is None and quantization_config is None and torch.cuda.is_available():
        model = model.cuda()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    return model, processor


def main(argv=None):
    args = parse_args(argv)
    model, processor = load(args)

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(args.image).convert("RGB")},
                {"type": "text", "text": args.question},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)

    sparsity = None  # the checkpoint's config
    if args.dense:
        sparsity = False
    elif args.vision_keep_rate is not None:
        sparsity = {"vision_keep_rate": args.vision_keep_rate}
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        sparsity=sparsity,
    )
    answer = processor.decode(output.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer.strip()}")

    cache = output.get("cache", output.get("past_key_values"))  # named `cache` from transformers 5.24 on
    report = cache.sparsity_report()[0]
    print(f"image tokens kept: {report['image_tokens_kept']}/{report['image_tokens_total']}")
    print(f"generated tokens kept in the cache: {report['generated_tokens_kept']}/{report['generated_tokens_total']}")
    print(
        f"KV cache: {report['stored_kv_bytes']} bytes stored, {report['dense_kv_bytes']} bytes dense "
        f"({report['kv_bytes_ratio']:.1%})"
    )


if __name__ == "__main__":
    main()
