"""Per-call vision token selectors: the learned image predictor, a seeded random subset and FastV-style attention."""

import pytest
import torch
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_models import build_prompts, images_per_row, llava_twin, tiny_config, tiny_model

from dynamic_llava_hf import DynamicLlavaConfig, SparsitySettings
from mask_reference import generation_positions
from test_modeling_prefill import run


TOKENS_PER_IMAGE = 9
# Left padding, a text-only row and a two-image row.
RAGGED_ROWS = [(2, 1, 6), (9, 0, 3), (1, 2, 2), (5, 1, 1)]
ROWS = [(3, 1, 5), (8, 1, 2), (1, 1, 1)]
NEW_TOKENS = 6


def generate(model, input_ids, attention_mask, pixel_values, **kwargs):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
        **kwargs,
    )


def image_ends_the_prompt():
    """One row whose prompt ends with its image (build_prompts always puts a token after an image)."""
    input_ids, attention_mask, pixel_values = build_prompts([(3, 1, 0)])
    return input_ids[:, :-1], attention_mask[:, :-1], pixel_values


@torch.no_grad()
def fastv_reference(model, input_ids, attention_mask, pixel_values, keep_rate):
    """Kept image-token indices per row, from the eager attention weights of transformers' Llava at `sparse_layer`:
    averaged over heads and over the row's queries after its last image (its last token if there are none)."""
    llava = llava_twin(model, "eager")
    attentions = llava(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        position_ids=generation_positions(attention_mask),
        output_attentions=True,
    ).attentions[model.config.sparse_layer]  # [batch, heads, queries, keys]
    num_kept = int(TOKENS_PER_IMAGE * keep_rate)
    kept_per_row = []
    for row in range(input_ids.shape[0]):  # a plain loop: the readable reference
        image_positions = (input_ids[row] == model.config.image_token_id).nonzero().flatten()
        valid_positions = attention_mask[row].nonzero().flatten()
        kept = []
        if len(image_positions):
            queries = valid_positions[valid_positions > image_positions.max()]
            if len(queries) == 0:
                queries = valid_positions[-1:]
            received = attentions[row][:, queries].mean(dim=(0, 1))  # [keys]
            for start in range(0, len(image_positions), TOKENS_PER_IMAGE):
                scores = received[image_positions[start : start + TOKENS_PER_IMAGE]]
                ranked = scores.sort(descending=True).values
                assert ranked[num_kept - 1] - ranked[num_kept] > 1e-6, "a near tie would make the test flaky"
                kept.append(scores.topk(num_kept).indices.sort().values + start)
        kept_per_row.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
    return kept_per_row


def assert_same_indices(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), (a, b)


# ---------------------------------------------------------------------------------------------------------------------
# random


@pytest.mark.parametrize("keep_rate", [0.5, 0.2])
def test_random_is_seeded_and_keeps_floor_n_times_rate_per_image(keep_rate):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)

    def kept(seed):
        sparsity = {"vision_selector": "random", "vision_selector_seed": seed, "vision_keep_rate": keep_rate}
        return run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity).kept_image_token_indices

    first, again, other = kept(0), kept(0), kept(1)
    assert_same_indices(first, again)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    per_image = int(TOKENS_PER_IMAGE * keep_rate)
    assert [len(k) for k in first] == [n * per_image for n in images_per_row(RAGGED_ROWS)]

    # As specified: one row of CPU-generator scores per image in batch order, top-k, ascending.
    scores = torch.rand(4, TOKENS_PER_IMAGE, generator=torch.Generator().manual_seed(1))
    expected = scores.topk(per_image).indices.sort().values + torch.tensor([0, 0, 9, 0])[:, None]
    assert_same_indices(other, [expected[0], expected[:0].flatten(), expected[1:3].flatten(), expected[3]])


def test_random_from_the_config_is_the_default_of_each_call():
    model = tiny_model(vision_selector="random", vision_selector_seed=3)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    default = run(model, input_ids, attention_mask, pixel_values)
    sparsity = {"vision_selector": "random", "vision_selector_seed": 3}
    explicit = run(tiny_model(), input_ids, attention_mask, pixel_values, sparsity=sparsity)
    assert_same_indices(default.kept_image_token_indices, explicit.kept_image_token_indices)
    learned = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_selector": "learned"})
    assert any(
        not torch.equal(a, b) for a, b in zip(default.kept_image_token_indices, learned.kept_image_token_indices)
    )


# ---------------------------------------------------------------------------------------------------------------------
# fastv


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.2])
def test_fastv_equals_eager_attention_weights_of_llava(attn_implementation, keep_rate):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    sparsity = {"vision_selector": "fastv", "vision_keep_rate": keep_rate}
    ours = run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    theirs = fastv_reference(model, input_ids, attention_mask, pixel_values, keep_rate)
    assert_same_indices(ours.kept_image_token_indices, theirs)
    # Not what the learned predictor keeps.
    learned = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": keep_rate})
    assert any(not torch.equal(a, b) for a, b in zip(ours.kept_image_token_indices, learned.kept_image_token_indices))


def test_fastv_uses_the_last_token_when_the_image_ends_the_prompt():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = image_ends_the_prompt()
    assert input_ids[0, -1] == model.config.image_token_id
    ours = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_selector": "fastv"})
    theirs = fastv_reference(model, input_ids, attention_mask, pixel_values, model.config.vision_keep_rate)
    assert_same_indices(ours.kept_image_token_indices, theirs)


@pytest.mark.parametrize("selector", ["learned", "fastv"])
def test_batched_with_left_padding_equals_each_row_alone(selector):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    sparsity = {"vision_selector": selector}
    batched = run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    pixels = pixel_values.split(images_per_row(RAGGED_ROWS))
    for row in range(len(RAGGED_ROWS)):
        real = attention_mask[row].bool()
        ids = input_ids[row, real][None]
        alone = run(model, ids, torch.ones_like(ids), pixels[row] if len(pixels[row]) else None, sparsity=sparsity)
        assert (batched.logits[row, real] - alone.logits[0]).abs().max() <= 1e-5
        if alone.kept_image_token_indices is None:  # a text-only row alone runs no image pruning
            assert batched.kept_image_token_indices[row].numel() == 0
        else:
            assert torch.equal(batched.kept_image_token_indices[row], alone.kept_image_token_indices[0])


@pytest.mark.parametrize("selector", ["fastv", "random"])
def test_a_model_without_an_image_predictor_prunes_with_a_training_free_selector(selector):
    model = tiny_model(use_vision_predictor=False)
    assert model.model.image_score_predictor is None
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    assert run(model, input_ids, attention_mask, pixel_values).kept_image_token_indices is None
    sparsity = {"use_vision_predictor": True, "vision_selector": selector}
    out = run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    assert [len(k) for k in out.kept_image_token_indices] == [4 * n for n in images_per_row(RAGGED_ROWS)]
    if selector == "fastv":
        theirs = fastv_reference(model, input_ids, attention_mask, pixel_values, model.config.vision_keep_rate)
        assert_same_indices(out.kept_image_token_indices, theirs)
    # The learned selector still needs the predictor.
    with pytest.raises(ValueError, match="image_score_predictor.*fastv"):
        run(model, input_ids, attention_mask, pixel_values, sparsity={"use_vision_predictor": True})


# ---------------------------------------------------------------------------------------------------------------------
# generate()


@pytest.mark.parametrize("selector", ["learned", "random", "fastv"])
def test_generate_with_each_selector_reports_the_kept_image_tokens(selector):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    sparsity = {"vision_selector": selector, "vision_keep_rate": 0.2}
    prefill = run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    cached = generate(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    for entry in cached.get(CACHE_NAME).sparsity_report():
        assert (entry["image_tokens_kept"], entry["image_tokens_total"]) == (1, 9)
    # Prompt length - 8 dropped image tokens + kept generated tokens are stored in the sparse layers.
    stored = cached.get(CACHE_NAME).stored_lengths()[-1]
    for row, entry in enumerate(cached.get(CACHE_NAME).sparsity_report()):
        assert stored[row] == int(attention_mask[row].sum()) - 8 + entry["generated_tokens_kept"]
    # The first generated token is the prefill's argmax, and decoding without a cache selects the same tokens.
    assert torch.equal(cached.sequences[:, input_ids.shape[1]], prefill.logits[:, -1].argmax(-1))
    uncached = generate(model, input_ids, attention_mask, pixel_values, sparsity=sparsity, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_generate_with_fastv_on_a_model_without_an_image_predictor():
    model = tiny_model(use_vision_predictor=False)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    sparsity = {"use_vision_predictor": True, "vision_selector": "fastv", "vision_keep_rate": 0.2}
    out = generate(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    assert [entry["image_tokens_kept"] for entry in out.get(CACHE_NAME).sparsity_report()] == [1, 1, 1]
    dense = generate(model, input_ids, attention_mask, pixel_values)
    assert [entry["image_tokens_kept"] for entry in dense.get(CACHE_NAME).sparsity_report()] == [9, 9, 9]


# ---------------------------------------------------------------------------------------------------------------------
# Settings and errors


def test_config_field_round_trips_and_feeds_the_default_settings(tmp_path):
    config = tiny_config(vision_selector="fastv", vision_selector_seed=7)
    config.save_pretrained(tmp_path)
    loaded = DynamicLlavaConfig.from_pretrained(tmp_path)
    assert (loaded.vision_selector, loaded.vision_selector_seed) == ("fastv", 7)
    settings = SparsitySettings.from_config(loaded)
    assert (settings.vision_selector, settings.vision_selector_seed) == ("fastv", 7)
    assert SparsitySettings(True, 0.5, True, False).vision_selector == "learned"
    assert DynamicLlavaConfig().vision_selector == "learned"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_selector": "topk"}, r"vision_selector must be one of \['learned', 'random', 'fastv'\], got 'topk'"),
        ({"vision_selector": None}, "vision_selector must be one of"),
        ({"vision_selector_seed": -1}, "vision_selector_seed must be a non-negative int"),
        ({"vision_selector_seed": 1.5}, "vision_selector_seed must be a non-negative int"),
    ],
)
def test_bad_selector_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    with pytest.raises(ValueError, match=message):
        run(model, input_ids, attention_mask, pixel_values, sparsity=overrides)
    with pytest.raises(ValueError, match=message):
        generate(model, input_ids, attention_mask, pixel_values, sparsity=overrides)


@pytest.mark.parametrize("selector", ["random", "fastv"])
def test_training_with_a_baseline_selector_raises(selector):
    model = tiny_model().train()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    with pytest.raises(ValueError, match=f"vision_selector='{selector}' is an inference-time baseline"):
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            use_cache=False,
            sparsity={"vision_selector": selector},
        )
    # Without image pruning the selector is irrelevant.
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        use_cache=False,
        sparsity={"vision_selector": selector, "use_vision_predictor": False},
    )
