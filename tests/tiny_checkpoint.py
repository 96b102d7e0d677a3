"""A tiny Dynamic-LLaVA checkpoint folder as a user would get it: weights, remote code and a LLaVA-1.5 processor.

The processor is the package's own (`dynamic_llava_hf.processing`) around the word-level test tokenizer; the model's
vocabulary, image/pad ids and image size are chosen to match it, so `AutoProcessor`, the Auto model classes and
`pipeline("image-text-to-text")` all work on the folder without downloads.
"""

import numpy as np
from PIL import Image
from tiny_models import IMAGE_SIZE, tiny_model
from tiny_processor import tiny_tokenizer

from dynamic_llava_hf.processing import add_llava_special_tokens, build_processor


def tiny_llava_processor():
    tokenizer = tiny_tokenizer()
    add_llava_special_tokens(tokenizer)  # <image> = 64, <pad> = 65
    return build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=14)


def tiny_checkpoint_model(processor=None, seed: int = 0, **overrides):
    """A tiny random model whose vocabulary is exactly the tiny processor's (so every generated id decodes)."""
    tokenizer = (processor or tiny_llava_processor()).tokenizer
    text_overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    text_overrides.update(overrides.pop("text_overrides", {}))
    return tiny_model(
        seed=seed,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        text_overrides=text_overrides,
        **overrides,
    )


def save_tiny_checkpoint(folder, seed: int = 0, **overrides):
    """Saves model + processor into `folder` and returns both."""
    processor = tiny_llava_processor()
    model = tiny_checkpoint_model(processor, seed=seed, **overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def tiny_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of different, non-square sizes (so LLaVA-1.5's pad-to-square matters)."""
    rng = np.random.default_rng(seed)
    sizes = [(60, 40), (30, 52), (42, 42), (25, 70)]
    return [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in (sizes[index % len(sizes)] for index in range(count))
    ]


def chat(question: str, image=None) -> list[dict]:
    """One user turn with one image and a question, in the chat format of processors and pipelines (which need the
    image inside the message)."""
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]
