"""generate(prefill_chunk_size=N) gives what the unchunked prefill gives, or is refused before anything runs."""

import pytest
import torch

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_models import PAD_TOKEN_ID, build_prompts, tiny_model
from tolerances import FP32_SAME_MATH


# Two rows of 28 tokens, each image at prompt positions 9-17: chunks of 9 hold it whole and leave a 1-token last chunk.
ROWS = [(8, 1, 9), (8, 1, 9)]


def generate(model, input_ids, attention_mask, pixel_values, **kwargs):
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD_TOKEN_ID,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def assert_same_generation(chunked, whole):
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(
        torch.stack(chunked.logits), torch.stack(whole.logits), atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH
    )
    chunked_cache, whole_cache = chunked.get(CACHE_NAME), whole.get(CACHE_NAME)
    assert torch.equal(chunked_cache.stored_lengths(), whole_cache.stored_lengths())
    assert chunked_cache.sparsity_report() == whole_cache.sparsity_report()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("chunk_size", [9, 27, 10, 19])  # 9, 27: a 1-token last chunk; 10, 19: images in one chunk
def test_chunks_that_keep_each_image_whole_equal_the_whole_prompt(attn_implementation, chunk_size):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    if chunk_size == 10:  # 10 splits the image at 9-17: shift it right by one with a longer left padding
        input_ids, attention_mask, pixel_values = build_prompts([(9, 1, 8), (9, 1, 8)])
    whole = generate(model, input_ids, attention_mask, pixel_values)
    chunked = generate(model, input_ids, attention_mask, pixel_values, prefill_chunk_size=chunk_size)
    assert_same_generation(chunked, whole)
    kept = [row["image_tokens_kept"] for row in whole.get(CACHE_NAME).sparsity_report()]
    assert kept == [4, 4]  # pruning really ran


@pytest.mark.parametrize("seed", range(8))
def test_a_one_token_last_chunk_is_prompt_not_a_generated_token(seed):
    # Text only, output-text predictor on: before the fix the last prompt token was gated like a generated one.
    model = tiny_model()
    input_ids, attention_mask, _ = build_prompts([(14 + seed, 0, 0), (10, 0, 0)], seed=seed)
    whole = generate(model, input_ids, attention_mask, None)
    chunked = generate(model, input_ids, attention_mask, None, prefill_chunk_size=input_ids.shape[1] - 1)
    assert_same_generation(chunked, whole)
    assert [row["generated_tokens_total"] for row in chunked.get(CACHE_NAME).sparsity_report()] == [7, 7]


def test_without_image_pruning_any_chunk_size_is_exact():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts([(3, 2, 5), (8, 1, 2)])
    off = {"use_vision_predictor": False}
    whole = generate(model, input_ids, attention_mask, pixel_values, sparsity=off)
    for chunk_size in (1, 4, 7):
        chunked = generate(model, input_ids, attention_mask, pixel_values, sparsity=off, prefill_chunk_size=chunk_size)
        assert_same_generation(chunked, whole)


def test_a_chunk_that_splits_an_image_is_refused_with_a_size_that_works():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts([(3, 2, 5), (8, 1, 2)])  # two images in row 0
    with pytest.raises(ValueError, match=r"prefill_chunk_size=4 splits image 0 of row 0 .* >= 26") as error:
        generate(model, input_ids, attention_mask, pixel_values, prefill_chunk_size=4)
    assert "not multiples" not in str(error.value)
    with pytest.raises(ValueError, match="splits image 1 of row 0"):
        generate(model, input_ids, attention_mask, pixel_values, prefill_chunk_size=15)
    suggested = generate(model, input_ids, attention_mask, pixel_values, prefill_chunk_size=26)
    assert_same_generation(suggested, generate(model, input_ids, attention_mask, pixel_values))


def test_whole_prompt_selectors_and_the_instruct_predictor_refuse_chunks():
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    for selector in ("fastv", "random"):
        with pytest.raises(ValueError, match=f"vision_selector='{selector}'.*prefill_chunk_size >= 28"):
            generate(
                tiny_model(),
                input_ids,
                attention_mask,
                pixel_values,
                sparsity={"vision_selector": selector},
                prefill_chunk_size=9,
            )
    instruct = tiny_model(use_instruct_predictor=True)
    with pytest.raises(ValueError, match="instruct predictor"):
        generate(instruct, input_ids, attention_mask, pixel_values, prefill_chunk_size=9)
    # One chunk holding the whole prompt is no chunking at all.
    generate(instruct, input_ids, attention_mask, pixel_values, prefill_chunk_size=28)
