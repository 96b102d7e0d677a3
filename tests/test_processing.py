"""LLaVA-1.5 processor pieces: vicuna_v1 chat template, expand2square preprocessing, special tokens, vocab padding."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_processor import tiny_tokenizer
from transformers import AutoProcessor, LlavaProcessor

from dynamic_llava_hf.processing import (
    VICUNA_V1_CHAT_TEMPLATE,
    add_llava_special_tokens,
    build_image_processor,
    build_processor,
    extend_vocab_rows,
    padded_vocab_size,
)


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def processor():
    tokenizer = tiny_tokenizer()
    add_llava_special_tokens(tokenizer)
    return build_processor(tokenizer, image_size=42)


def render(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


def image_message(question, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}


def test_single_turn_is_vicuna_v1(processor):
    prompt = render(processor, [image_message("What is shown?")], add_generation_prompt=True)
    assert prompt == f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"


def test_multi_turn_is_vicuna_v1(processor):
    messages = [
        image_message("What is shown?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "Black."},
    ]
    expected = (
        f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: What colour is it? ASSISTANT: Black.</s>"
    )
    assert render(processor, messages) == expected
    assert render(processor, messages[:3], add_generation_prompt=True) == expected.rsplit(" Black.</s>", 1)[0]


def test_several_images_each_get_a_placeholder_line(processor):
    prompt = render(processor, [image_message("Compare them.", images=2)], add_generation_prompt=True)
    assert prompt == f"{SYSTEM} USER: <image>\n<image>\nCompare them. ASSISTANT:"


@pytest.mark.parametrize("content", ["Answer briefly.", [{"type": "text", "text": "Answer briefly."}]])
def test_system_message_replaces_the_default(processor, content):
    messages = [{"role": "system", "content": content}, image_message("Why?")]
    assert render(processor, messages, add_generation_prompt=True) == "Answer briefly. USER: <image>\nWhy? ASSISTANT:"


def test_plain_string_content_and_no_generation_prompt(processor):
    assert render(processor, [{"role": "user", "content": "Hi"}]) == f"{SYSTEM} USER: Hi "


def test_unknown_role_is_refused(processor):
    with pytest.raises(Exception, match="roles system"):
        render(processor, [{"role": "tool", "content": "x"}])


def test_assistant_tokens_mask_covers_the_answer(processor):
    messages = [image_message("w1"), {"role": "assistant", "content": "w2 w3"}]
    image = Image.new("RGB", (42, 42))
    messages[0]["content"][0] = {"type": "image", "image": image}
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    answer = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert answer.tolist() == processor.tokenizer.convert_tokens_to_ids(["w2", "w3", "</s>"])


def expand2square_then_clip(image: Image.Image, size: int) -> np.ndarray:
    """LLaVA-1.5 by hand: paste onto a mean-coloured square, PIL bicubic resize, [0, 1], CLIP normalisation."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(value * 255) for value in CLIP_MEAN))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.mark.parametrize("width, height", [(50, 30), (20, 61)])
def test_image_preprocessing_is_llava_expand2square(width, height):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    processed = build_image_processor(image_size=42)(image, return_tensors="pt")["pixel_values"]
    assert processed.shape == (1, 3, 42, 42)
    expected = torch.from_numpy(expand2square_then_clip(image, 42)).float()
    assert (processed[0] - expected).abs().max() <= 1e-5  # float32 vs float64 of the same arithmetic
    # The padding really is the mean colour: it normalises to ~0 at the padded border (the mean is rounded to whole
    # 8-bit levels: up to 0.5 / 255 / std ~ 0.007 after normalisation).
    border = processed[0, :, 0, :] if width > height else processed[0, :, :, 0]
    assert border.abs().max() < 0.02


@pytest.mark.parametrize("image_size, tokens_per_image", [(42, 9), (336, 576)])
def test_processor_expands_each_image_into_its_patch_count(image_size, tokens_per_image):
    tokenizer = tiny_tokenizer()
    ids = add_llava_special_tokens(tokenizer)
    processor = build_processor(tokenizer, image_size=image_size)
    images = [Image.new("RGB", (40, 25), "red"), Image.new("RGB", (25, 40), "blue")]
    prompts = ["USER: <image>\nw1 ASSISTANT:", "USER: <image>\n<image>\nw1 w2 w3 ASSISTANT:"]
    out = processor(images=[images[:1], images], text=prompts, padding=True, return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, image_size, image_size)
    assert (out["input_ids"] == ids.image_token_id).sum(1).tolist() == [tokens_per_image, 2 * tokens_per_image]
    # Left padding for batched generation.
    assert out["attention_mask"][0, 0] == 0 and out["input_ids"][0, 0] == ids.pad_token_id


def test_add_llava_special_tokens_like_llava_hf():
    tokenizer = tiny_tokenizer()
    old_size = len(tokenizer)
    ids = add_llava_special_tokens(tokenizer)
    assert (ids.image_token_id, ids.pad_token_id) == (old_size, old_size + 1)
    assert ids.added_tokens == ("<image>", "<pad>")
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == old_size + 2
    assert tokenizer.encode("<image>", add_special_tokens=False) == [ids.image_token_id]
    again = add_llava_special_tokens(tokenizer)
    assert again.added_tokens == () and len(tokenizer) == old_size + 2
    assert (again.image_token_id, again.pad_token_id) == (ids.image_token_id, ids.pad_token_id)


def test_build_processor_needs_the_image_token():
    with pytest.raises(ValueError, match="add_llava_special_tokens"):
        build_processor(tiny_tokenizer())


def test_vocab_padding_and_new_rows():
    assert padded_vocab_size(32002) == 32064 and padded_vocab_size(64) == 64 and padded_vocab_size(65) == 128
    weight = torch.randn(10, 4)
    extended = extend_vocab_rows(weight, 64)
    assert extended.shape == (64, 4) and torch.equal(extended[:10], weight)
    # Near the mean (llava-hf: N(mean, 1e-5 * covariance): for unit-variance rows a standard deviation of ~0.003, so
    # 0.02 is over 6 sigma), deterministic, and all different (see test_convert's inputs_embeds test for why).
    assert torch.allclose(extended[10:], weight.mean(0).expand(54, -1), atol=0.02)
    assert not torch.allclose(extended[10:], weight.mean(0).expand(54, -1), atol=1e-6)
    assert torch.equal(extend_vocab_rows(weight, 64), extended)
    assert len(set(map(tuple, extended.tolist()))) == 64
    assert extend_vocab_rows(weight, 10) is weight
    with pytest.raises(ValueError, match="shrink"):
        extend_vocab_rows(weight, 9)


def test_saved_processor_reloads_with_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, LlavaProcessor)
    assert reloaded.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert reloaded.tokenizer.padding_side == "left"
    assert reloaded.image_processor.do_pad and reloaded.image_processor.crop_size["height"] == 42
    assert (reloaded.num_additional_image_tokens, reloaded.vision_feature_select_strategy) == (1, "default")
