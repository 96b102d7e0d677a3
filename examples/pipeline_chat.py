"""A multi-turn chat about one image through `pipeline("image-text-to-text")`, with Dynamic-LLaVA's sparsification on.

    python examples/pipeline_chat.py path/to/dynamic-llava-7b --image cat.jpg \
        --question "What animal is this?" --question "What colour is it?"

Each `--question` is one user turn; the pipeline renders the whole conversation with the checkpoint's vicuna_v1 chat
template and returns it with the new assistant message appended, which becomes the history of the next turn.
"""

import argparse

import torch
from PIL import Image
from transformers import pipeline


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="converted Dynamic-LLaVA folder or Hub repository id")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", action="append", help="a user turn (repeat for a conversation)")
    parser.add_argument("--trust-remote-code", action="store_true", help="use the code files saved with the weights")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype as transformers takes it: auto (as saved), bfloat16, float16, ...",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vision-keep-rate", type=float, help="override the fraction of image tokens kept")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.trust_remote_code:
        try:
            import dynamic_llava_hf  # noqa: F401  (registers the Auto classes for model_type "dynamic_llava")
        except ImportError:
            raise SystemExit("dynamic-llava-hf is not installed: install it or pass --trust-remote-code") from None
    pipe = pipeline(
        "image-text-to-text",
        model=args.model,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=0 if torch.cuda.is_available() else "cpu",
    )
    # generate() arguments reach the model, including Dynamic-LLaVA's per-call sparsity override.
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.vision_keep_rate is not None:
        generate_kwargs["sparsity"] = {"vision_keep_rate": args.vision_keep_rate}

    image = Image.open(args.image).convert("RGB")
    conversation = []
    for turn, question in enumerate(args.question or ["What is shown in this image?"]):
        content = [{"type": "text", "text": question}]
        if turn == 0:
            content.insert(0, {"type": "image", "image": image})
        conversation.append({"role": "user", "content": content})
        (result,) = pipe(text=conversation, generate_kwargs=dict(generate_kwargs))  # the pipeline edits the dict
        conversation = result["generated_text"]
        print(f"USER: {question}")
        print(f"ASSISTANT: {conversation[-1]['content'].strip()}")


if __name__ == "__main__":
    main()
