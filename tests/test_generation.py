"""generate() with the ragged DynamicLlavaCache: batched == per-row, cached == uncached == mask-based reference."""

import copy

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, StaticCache
from transformers.generation.streamers import BaseStreamer

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from dynamic_llava_hf import DynamicLlavaCache
from mask_reference import reference_greedy
from tiny_models import PAD_TOKEN_ID, build_prompts, images_per_row, tiny_model
from tolerances import FP32_SAME_MATH


ROWS = [(3, 1, 5), (8, 1, 2), (1, 1, 1)]
NEW_TOKENS = 12


def generate(model, input_ids, attention_mask, pixel_values, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True, **kwargs}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        eos_token_id=None,
        pad_token_id=PAD_TOKEN_ID,
        return_dict_in_generate=True,
        **kwargs,
    )


def rows_alone(input_ids, attention_mask, pixel_values, rows):
    pixels = pixel_values.split(images_per_row(rows))
    for row in range(len(rows)):
        ids = input_ids[row, attention_mask[row].bool()][None]
        yield row, ids, torch.ones_like(ids), pixels[row]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batched_greedy_equals_per_row(attn_implementation):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    batched = generate(model, input_ids, attention_mask, pixel_values)
    prompt = input_ids.shape[1]
    for row, ids, mask, pixels in rows_alone(input_ids, attention_mask, pixel_values, ROWS):
        alone = generate(model, ids, mask, pixels)
        assert torch.equal(batched.sequences[row, prompt:], alone.sequences[0, ids.shape[1] :])
        assert (torch.stack(batched.logits)[:, row] - torch.stack(alone.logits)[:, 0]).abs().max() <= FP32_SAME_MATH
        assert torch.equal(
            batched.get(CACHE_NAME).stored_lengths()[:, row], alone.get(CACHE_NAME).stored_lengths()[:, 0]
        )
    stored = batched.get(CACHE_NAME).stored_lengths()
    sparse_layer = model.config.sparse_layer
    # Ragged for real: rows differ, and the sparse layers store fewer entries than the full ones.
    assert len(set(stored[sparse_layer].tolist())) == len(ROWS)
    assert (stored[sparse_layer] < stored[0]).all()
    kept_generated = [r["generated_tokens_kept"] for r in batched.get(CACHE_NAME).sparsity_report()]
    assert len(set(kept_generated)) > 1, "rows should keep different numbers of generated tokens"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batched_beam_search_equals_per_row(attn_implementation):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    kwargs = {"num_beams": 3, "output_scores": True, "max_new_tokens": 8}
    batched = generate(model, input_ids, attention_mask, pixel_values, **kwargs)
    prompt = input_ids.shape[1]
    for row, ids, mask, pixels in rows_alone(input_ids, attention_mask, pixel_values, ROWS):
        alone = generate(model, ids, mask, pixels, **kwargs)
        assert torch.equal(batched.sequences[row, prompt:], alone.sequences[0, ids.shape[1] :])
        assert (batched.sequences_scores[row] - alone.sequences_scores[0]).abs() <= FP32_SAME_MATH
    assert isinstance(batched.get(CACHE_NAME), DynamicLlavaCache)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_uncached_generation_equals_cached(attn_implementation):
    model = tiny_model(attn_implementation, use_instruct_predictor=True)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    cached = generate(model, input_ids, attention_mask, pixel_values)
    uncached = generate(model, input_ids, attention_mask, pixel_values, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert (torch.stack(cached.logits) - torch.stack(uncached.logits)).abs().max() <= FP32_SAME_MATH
    assert uncached.get(CACHE_NAME) is None


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cached_generation_equals_mask_based_full_recompute(attn_implementation):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    cached = generate(model, input_ids, attention_mask, pixel_values)
    tokens, step_logits = reference_greedy(model, input_ids, attention_mask, pixel_values, NEW_TOKENS)
    assert torch.equal(cached.sequences[:, input_ids.shape[1] :], tokens)
    assert (torch.stack(cached.logits) - step_logits).abs().max() <= FP32_SAME_MATH


def test_eager_equals_sdpa():
    eager, sdpa = tiny_model("eager"), tiny_model("sdpa")
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    a = generate(eager, input_ids, attention_mask, pixel_values)
    b = generate(sdpa, input_ids, attention_mask, pixel_values)
    assert torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() <= FP32_SAME_MATH


def test_long_decode_grows_the_cache_geometrically():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts([(3, 1, 5), (8, 1, 2), (1, 1, 1), (5, 1, 3)])
    out = generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=200, output_logits=False)
    cache = out.get(CACHE_NAME)
    layers = len(cache.layers)
    # 200 steps with one reallocation per step would be 200 growth events per layer; amortised growth needs a few.
    assert cache.growth_events() <= 6 * layers
    assert all(layer.growth_events >= 1 for layer in cache.layers[: model.config.sparse_layer])
    assert cache.get_seq_length() == input_ids.shape[1] + 199
    # generate() tells the cache how many tokens it will see: no buffer is larger (the full layers fill theirs).
    assert cache.expected_tokens == cache.get_seq_length()
    assert all(layer.capacity <= cache.expected_tokens for layer in cache.layers)
    assert all(layer.capacity == cache.expected_tokens for layer in cache.layers[: model.config.sparse_layer])


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_sampling_multiple_sequences_and_streaming():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    torch.manual_seed(3)
    sampled = generate(model, input_ids, attention_mask, pixel_values, do_sample=True, num_return_sequences=2)
    assert sampled.sequences.shape == (6, input_ids.shape[1] + NEW_TOKENS)
    assert sampled.get(CACHE_NAME).stored_lengths().shape == (4, 6)

    row_ids, row_mask = input_ids[:1, attention_mask[0].bool()], None
    streamer = CollectingStreamer()
    streamed = generate(model, row_ids, row_mask, pixel_values[:1], streamer=streamer)
    assert streamer.ended
    assert torch.equal(
        torch.cat([c.flatten() for c in streamer.chunks[1:]]), streamed.sequences[0, row_ids.shape[1] :]
    )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_chat_continuation_with_the_returned_cache(attn_implementation):
    """A second turn passes the first turn's cache back with the new tokens; batched must equal per-row."""
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    second_turn = torch.tensor([[11, 12, 13, 14]] * len(ROWS))

    def two_turns(ids, mask, pixels):
        first = generate(model, ids, mask, pixels, max_new_tokens=6)
        seen = first.get(CACHE_NAME).get_seq_length()
        ids = torch.cat([first.sequences, second_turn[: ids.shape[0]]], dim=1)
        mask = torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        second = generate(model, ids, mask, None, max_new_tokens=6, **{CACHE_NAME: first.get(CACHE_NAME)})
        assert second.get(CACHE_NAME).get_seq_length() == seen + 1 + second_turn.shape[1] + 5
        return second

    batched = two_turns(input_ids, attention_mask, pixel_values)
    for row, ids, mask, pixels in rows_alone(input_ids, attention_mask, pixel_values, ROWS):
        alone = two_turns(ids, mask, pixels)
        assert torch.equal(batched.sequences[row, -6:], alone.sequences[0, -6:])
        assert (torch.stack(batched.logits)[:, row] - torch.stack(alone.logits)[:, 0]).abs().max() <= FP32_SAME_MATH


def test_an_empty_dynamic_cache_is_replaced():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    out = generate(model, input_ids, attention_mask, pixel_values, **{CACHE_NAME: DynamicCache()})
    assert isinstance(out.get(CACHE_NAME), DynamicLlavaCache)
    reference = generate(model, input_ids, attention_mask, pixel_values)
    assert torch.equal(out.sequences, reference.sequences)


def test_unsupported_caches_and_assisted_decoding_are_refused():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    with pytest.raises(ValueError, match="cache_implementation"):
        generate(model, input_ids, attention_mask, pixel_values, cache_implementation="quantized")
    static = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(TypeError, match="DynamicLlavaCache"):
        generate(model, input_ids, attention_mask, pixel_values, **{CACHE_NAME: static})
    for sparsity in (None, {"use_output_text_predictor": False, "vision_selector": "fastv"}):
        with pytest.raises(ValueError, match="Assisted"):
            generate(model, input_ids[:1], attention_mask[:1], pixel_values[:1], prompt_lookup_num_tokens=2)


@pytest.mark.parametrize("sparsity", [False, {"use_output_text_predictor": False}])
def test_prompt_lookup_decoding_equals_greedy(sparsity):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS[:1])
    input_ids = torch.cat([input_ids, input_ids[:, -6:], input_ids[:, -6:]], dim=-1)  # text to look candidates up in
    attention_mask = torch.ones_like(input_ids)
    greedy = generate(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    lookup = generate(model, input_ids, attention_mask, pixel_values, sparsity=sparsity, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup.sequences, greedy.sequences)
    torch.testing.assert_close(torch.stack(lookup.logits), torch.stack(greedy.logits))


@torch.no_grad()
@pytest.mark.parametrize("sparsity", [None, {"use_output_text_predictor": False}])
def test_crop_forgets_exactly_the_last_tokens(sparsity):
    """A cache that saw three more tokens and forgot two equals one that saw only the first: stored entries, lengths
    and the next step's logits (the output-text predictor's earlier drops stay dropped)."""
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    kwargs = dict(use_cache=True, sparsity=sparsity)
    first = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs)
    for _ in range(3):  # a few decoding steps (gated by the output-text predictor where it is on)
        token = first.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
        first = model(input_ids=token, attention_mask=attention_mask, **{CACHE_NAME: first[CACHE_NAME]}, **kwargs)
    reference = copy.deepcopy(first[CACHE_NAME])
    candidates = torch.randint(3, 90, (len(ROWS), 3))
    step_mask = torch.cat([attention_mask, torch.ones_like(candidates)], dim=-1)
    cropped = copy.deepcopy(reference)
    model(input_ids=candidates, attention_mask=step_mask, **{CACHE_NAME: cropped}, **kwargs)
    cropped.crop(-2)
    # As prompt text (prefill=True), as the three were: a single generated token would be gated instead.
    one = dict(input_ids=candidates[:, :1], attention_mask=step_mask[:, :-2], prefill=True)
    model(**one, **{CACHE_NAME: reference}, **kwargs)
    assert cropped.get_seq_length() == reference.get_seq_length()
    assert torch.equal(cropped.stored_lengths(), reference.stored_lengths())
    for ours, theirs, lengths in zip(cropped.layers, reference.layers, reference.stored_lengths()):
        for row, length in enumerate(lengths.tolist()):  # behind a row's entries is scratch
            torch.testing.assert_close(ours.keys[row, :, :length], theirs.keys[row, :, :length])
            torch.testing.assert_close(ours.values[row, :, :length], theirs.values[row, :, :length])
    token = candidates[:, 1:2]
    outputs = [
        model(input_ids=token, attention_mask=step_mask[:, :-1], **{CACHE_NAME: cache}, **kwargs).logits
        for cache in (cropped, reference)
    ]
    torch.testing.assert_close(*outputs)


def test_cache_bookkeeping_survives_beam_reordering():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    out = generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=3)
    cache = copy.deepcopy(out.get(CACHE_NAME))
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    assert torch.equal(cache.stored_lengths(), out.get(CACHE_NAME).stored_lengths()[:, order])
    original = out.get(CACHE_NAME).sparsity_report()
    assert cache.sparsity_report() == [original[i] for i in order.tolist()]
    cache.batch_repeat_interleave(2)
    assert cache.stored_lengths().shape == (4, 6)


def test_text_streamer_prints_the_generated_text(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextStreamer

    vocab = {f"w{i}": i for i in range(100)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS[:1])
    out = generate(model, input_ids, attention_mask, pixel_values, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out.split()
    assert printed == [f"w{i}" for i in out.sequences[0, input_ids.shape[1] :].tolist()]


def test_save_and_reload_with_auto_classes(tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText

    from dynamic_llava_hf import DynamicLlavaForConditionalGeneration, DynamicLlavaModel

    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, DynamicLlavaForConditionalGeneration)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DynamicLlavaModel)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    a = generate(model, input_ids, attention_mask, pixel_values)
    b = generate(reloaded, input_ids, attention_mask, pixel_values)
    assert torch.equal(a.sequences, b.sequences)


def test_sparsity_report_counts_what_was_kept():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    dense = generate(model, input_ids, attention_mask, pixel_values, sparsity=False).get(CACHE_NAME)
    for entry in dense.sparsity_report():
        assert (entry["image_tokens_kept"], entry["image_tokens_total"]) == (9, 9)
        assert (entry["generated_tokens_kept"], entry["generated_tokens_total"]) == (NEW_TOKENS - 1, NEW_TOKENS - 1)
        assert entry["stored_kv_bytes"] == entry["dense_kv_bytes"] and entry["kv_bytes_ratio"] == 1.0

    sparse = generate(model, input_ids, attention_mask, pixel_values).get(CACHE_NAME)
    stored = sparse.stored_lengths()
    for row, entry in enumerate(sparse.sparsity_report()):
        assert (entry["image_tokens_kept"], entry["image_tokens_total"]) == (4, 9)
        prompt = int(attention_mask[row].sum())
        assert stored[-1, row] == prompt - 5 + entry["generated_tokens_kept"]
        assert entry["kv_bytes_ratio"] < 1.0


# ---------------------------------------------------------------------------------------------------------------------
# A cache from somewhere else says so (issue #13, item 6)


def test_a_cache_of_another_batch_size_is_named():
    model = tiny_model()
    one_row = build_prompts([(3, 1, 5)])
    two_rows = build_prompts([(3, 1, 5), (2, 1, 4)])
    inputs = dict(zip(("input_ids", "attention_mask", "pixel_values"), one_row))
    cache = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True).get(CACHE_NAME)
    inputs = dict(zip(("input_ids", "attention_mask", "pixel_values"), two_rows))
    with pytest.raises(ValueError, match=r"holds 1 row\(s\) from an earlier call, but the input has 2"):
        model.generate(**inputs, **{CACHE_NAME: cache}, max_new_tokens=2)


def test_a_cache_built_for_another_sparse_layer_is_named():
    model = tiny_model(sparse_layer=3)
    input_ids, attention_mask, pixel_values = build_prompts([(3, 1, 5)])
    cache = DynamicLlavaCache(tiny_model(sparse_layer=2).config)
    with pytest.raises(
        ValueError, match="built for a model with sparse_layer=2 and 4 layers, but this model has sparse"
    ):
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            **{CACHE_NAME: cache},
            max_new_tokens=2,
        )
    # The same when the model's config changed after the cache was built.
    cache = DynamicLlavaCache(model.config)
    model.config.sparse_layer = 1
    with pytest.raises(ValueError, match="sparse_layer=3 and 4 layers, but this model has sparse_layer=1"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, past_key_values=cache)


def test_continuous_batching_is_refused_before_any_request_runs():
    # transformers would run it and report every request as failed with an empty output (no exception).
    model = tiny_model()
    input_ids, _, _ = build_prompts(ROWS[:1])
    generation_config = GenerationConfig(max_new_tokens=2, eos_token_id=None, pad_token_id=PAD_TOKEN_ID)
    with pytest.raises(NotImplementedError, match="Continuous batching .* per layer and row"):
        model.generate_batch([input_ids[0].tolist()], generation_config=generation_config)
    with pytest.raises(NotImplementedError, match="Continuous batching"):
        with model.continuous_batching_context_manager(generation_config=generation_config):
            pass
