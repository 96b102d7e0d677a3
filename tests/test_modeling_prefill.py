"""Prefill: equivalence with transformers' Llava, with a mask-based reference, and batched with per-row runs."""

import logging

import numpy as np
import pytest
import torch

from dynamic_llava_hf import DynamicLlavaForConditionalGeneration, SparsitySettings
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from mask_reference import generation_positions, reference_forward
from tiny_models import IMAGE_SIZE, build_prompts, images_per_row, llava_twin, tiny_config, tiny_model
from tolerances import FP32_SAME_MATH


# Three left-padded rows whose image sits at different positions.
MIXED_ROWS = [(3, 1, 5), (8, 1, 2), (1, 1, 1)]
# Left padding, a text-only row and a two-image row.
RAGGED_ROWS = [(2, 1, 6), (9, 0, 3), (1, 2, 2), (5, 1, 1)]


def run(model, input_ids, attention_mask, pixel_values, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=generation_positions(attention_mask),
            **kwargs,
        )


def split_pixels(pixel_values, rows):
    counts = images_per_row(rows)
    return list(pixel_values.split(counts))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "sparsity",
    [False, {"vision_keep_rate": 1.0, "use_output_text_predictor": False, "use_instruct_predictor": False}],
    ids=["off", "keep_all"],
)
def test_matches_llava_when_nothing_is_pruned(attn_implementation, sparsity):
    model = tiny_model(attn_implementation, use_instruct_predictor=True)
    llava = llava_twin(model, attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    ours = run(model, input_ids, attention_mask, pixel_values, sparsity=sparsity)
    theirs = run(llava, input_ids, attention_mask, pixel_values)
    valid = attention_mask.bool()
    assert (ours.logits - theirs.logits)[valid].abs().max() <= FP32_SAME_MATH
    if sparsity is False:
        assert ours.kept_image_token_indices is None
    else:
        assert all(torch.equal(kept, torch.arange(9)) for kept in ours.kept_image_token_indices)


def test_matches_llava_with_keep_rate_one_in_the_config():
    model = tiny_model(vision_keep_rate=1.0, use_output_text_predictor=False)
    llava = llava_twin(model, "sdpa")
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        theirs = llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert (ours.logits - theirs.logits)[attention_mask.bool()].abs().max() <= FP32_SAME_MATH


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.2])
def test_physical_pruning_equals_mask_based_computation(attn_implementation, keep_rate):
    model = tiny_model(attn_implementation)
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    ours = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": keep_rate})
    reference_logits, keep = reference_forward(model, input_ids, attention_mask, pixel_values, keep_rate=keep_rate)
    kept = keep & attention_mask.bool()
    assert (ours.logits - reference_logits)[kept].abs().max() <= FP32_SAME_MATH
    # Removed positions get zero logits; the number kept per image is floor(9 * rate).
    assert ours.logits[~keep].abs().max() == 0
    per_image = int(9 * keep_rate)
    assert [len(k) for k in ours.kept_image_token_indices] == [n * per_image for n in images_per_row(RAGGED_ROWS)]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("instruct", [False, True])
def test_batched_equals_each_row_alone(attn_implementation, instruct):
    model = tiny_model(attn_implementation, use_instruct_predictor=instruct)
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    batched = run(model, input_ids, attention_mask, pixel_values, output_hidden_states=True)
    batched_lengths = batched.get(CACHE_NAME).stored_lengths()

    for row, pixels in enumerate(split_pixels(pixel_values, RAGGED_ROWS)):
        real = attention_mask[row].bool()
        ids = input_ids[row, real][None]
        alone = run(model, ids, torch.ones_like(ids), pixels if len(pixels) else None, output_hidden_states=True)
        assert (batched.logits[row, real] - alone.logits[0]).abs().max() <= FP32_SAME_MATH
        if alone.kept_image_token_indices is None:  # a text-only row alone runs no image pruning
            assert batched.kept_image_token_indices[row].numel() == 0
        else:
            assert torch.equal(batched.kept_image_token_indices[row], alone.kept_image_token_indices[0])
        for ours, theirs in zip(batched.hidden_states, alone.hidden_states):
            assert (ours[row, real] - theirs[0]).abs().max() <= FP32_SAME_MATH
        assert torch.equal(batched_lengths[:, row], alone.get(CACHE_NAME).stored_lengths()[:, 0])
    # The text-only row keeps everything; the stored lengths differ per row and per layer group.
    assert batched.kept_image_token_indices[1].numel() == 0
    assert batched_lengths[0, 1] == batched_lengths[2, 1] == attention_mask[1].sum()
    assert len(set(batched_lengths[-1].tolist())) > 1 and (batched_lengths[0] > batched_lengths[-1]).any()


def test_instruct_predictor_prunes_text_after_the_image_but_keeps_the_last_token():
    model = tiny_model(use_instruct_predictor=True)
    input_ids, attention_mask, pixel_values = build_prompts([(4, 1, 12), (6, 0, 8)])
    out = run(model, input_ids, attention_mask, pixel_values, sparsity={"use_vision_predictor": False})
    removed = (out.logits == 0).all(-1) & attention_mask.bool()
    image_end = (input_ids[0] == model.config.image_token_id).nonzero().max()
    assert removed[0, image_end + 1 : -1].any(), "the random instruct predictor should drop some text"
    assert not removed[0, : image_end + 1].any()
    assert not removed[:, -1].any()
    assert not removed[1].any(), "rows without an image are not pruned"


def test_outputs_are_aligned_with_the_inputs():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    out = run(model, input_ids, attention_mask, pixel_values, output_hidden_states=True)
    assert out.logits.shape[:2] == input_ids.shape
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert all(h.shape[:2] == input_ids.shape for h in out.hidden_states)
    image_mask = input_ids == model.config.image_token_id
    for row, kept in enumerate(out.kept_image_token_indices):
        assert torch.equal(kept, kept.sort().values)
        image_positions = image_mask[row].nonzero().flatten()
        removed = torch.ones(9, dtype=torch.bool)
        removed[kept] = False
        assert out.logits[row, image_positions[removed]].abs().max() == 0
        assert out.logits[row, image_positions[kept]].abs().min() > 0
    assert out.image_hidden_states.shape == (3, 9, model.config.text_config.hidden_size)


def test_sparsity_can_be_changed_per_call_without_touching_the_config():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    half = run(model, input_ids, attention_mask, pixel_values)
    third = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": 1 / 3})
    settings = SparsitySettings(True, 1 / 3, True, False)
    same = run(model, input_ids, attention_mask, pixel_values, sparsity=settings)
    assert [len(k) for k in half.kept_image_token_indices] == [4, 4, 4]
    assert [len(k) for k in third.kept_image_token_indices] == [3, 3, 3]
    torch.testing.assert_close(third.logits, same.logits)
    assert model.config.vision_keep_rate == 0.5


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    with pytest.raises(ValueError, match="image tokens"):
        run(model, input_ids, attention_mask, pixel_values[:2])
    too_few = input_ids.clone()
    too_few[0, (too_few[0] == model.config.image_token_id).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="image tokens"):
        run(model, too_few, attention_mask, pixel_values)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        run(model, input_ids, attention_mask, torch.randn(3, 3, IMAGE_SIZE + 14, IMAGE_SIZE))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        run(model, input_ids, attention_mask, torch.randn(3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 26, features: 27"):
        run(model, too_few, attention_mask, pixel_values)
    for rate in (0, 1.5):
        with pytest.raises(ValueError, match="vision_keep_rate"):
            run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": rate})
    with pytest.raises(ValueError, match="Unknown sparsity"):
        run(model, input_ids, attention_mask, pixel_values, sparsity={"keep_rate": 0.3})
    with pytest.raises(ValueError, match="instruct_score_predictor"):
        run(model, input_ids, attention_mask, pixel_values, sparsity={"use_instruct_predictor": True})
    with pytest.raises(ValueError, match="attention_mask"):
        run(model, input_ids, attention_mask[:, :, None, None].float(), pixel_values)
    with pytest.raises(ValueError, match="sparse_layer"):
        DynamicLlavaForConditionalGeneration(tiny_config(sparse_layer=4))


def test_image_tokens_without_images_are_ordinary_tokens_as_in_llava(caplog):
    model = tiny_model()
    input_ids, attention_mask, _ = build_prompts(MIXED_ROWS)
    logging.Logger.warning_once.cache_clear()  # transformers logs this once per process
    with caplog.at_level(logging.WARNING, logger="transformers"):
        out = run(model, input_ids, attention_mask, None)
    assert any("no pixel_values or image features" in record.getMessage() for record in caplog.records)
    assert out.kept_image_token_indices is None
    with torch.no_grad():
        expected = llava_twin(model, "sdpa")(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=generation_positions(attention_mask)
        )
    valid = attention_mask.bool()
    torch.testing.assert_close(out.logits[valid], expected.logits[valid], atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH)


def test_generate_checks_pixel_values_before_encoding_them():
    model = tiny_model()
    input_ids, attention_mask, _ = build_prompts(MIXED_ROWS)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.randn(3, 3, IMAGE_SIZE + 14, IMAGE_SIZE),
            max_new_tokens=2,
        )


@pytest.mark.parametrize("value", ["no", "false", None, 0])
def test_per_call_booleans_must_be_booleans(value):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    with pytest.raises(ValueError, match="use_vision_predictor must be True or False"):
        run(model, input_ids, attention_mask, pixel_values, sparsity={"use_vision_predictor": value})


def test_per_call_rates_accept_numpy_and_tensor_scalars():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    expected = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": 1 / 3})
    for rate in (np.float32(1 / 3), torch.tensor(1 / 3)):
        out = run(model, input_ids, attention_mask, pixel_values, sparsity={"vision_keep_rate": rate})
        assert [len(kept) for kept in out.kept_image_token_indices] == [3, 3, 3]
        torch.testing.assert_close(out.logits, expected.logits)


def test_a_config_changed_behind_the_checks_is_caught_at_forward():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    with pytest.raises(ValueError, match="sparse_layer must be in"):
        model.config.sparse_layer = 9
    # A config object that skipped the checks (e.g. written through __dict__) still cannot run.
    model.config.__dict__["sparse_layer"] = 9
    with pytest.raises(ValueError, match=r"sparse_layer must be in \[1, num_hidden_layers\) = \[1, 4\)"):
        run(model, input_ids, attention_mask, pixel_values)
    model.config.__dict__["sparse_layer"] = 2
    model.config.__dict__["use_output_text_predictor"] = "false"
    with pytest.raises(ValueError, match="use_output_text_predictor must be True or False"):
        run(model, input_ids, attention_mask, pixel_values)


@pytest.mark.parametrize("sparse_layer", [-1, 0, 99])
def test_from_pretrained_rejects_a_bad_sparse_layer(tmp_path, sparse_layer):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sparse_layer must be"):
        DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path, sparse_layer=sparse_layer)
    loaded = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path, sparse_layer=3)
    assert loaded.config.sparse_layer == 3


def test_untrained_predictors_are_not_used_unless_asked_for():
    model = tiny_model(predictors_trained=False)
    llava = llava_twin(model, "sdpa")
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    default = run(model, input_ids, attention_mask, pixel_values)
    expected = run(llava, input_ids, attention_mask, pixel_values)
    valid = attention_mask.bool()
    assert (default.logits - expected.logits)[valid].abs().max() <= FP32_SAME_MATH
    assert default.kept_image_token_indices is None
    # Asked for: all of them (True), or what a dict switches on.
    assert run(model, input_ids, attention_mask, pixel_values, sparsity=True).kept_image_token_indices
    only_images = run(model, input_ids, attention_mask, pixel_values, sparsity={"use_vision_predictor": True})
    assert only_images.kept_image_token_indices and only_images.output_keep_decisions is None
    # A training-free selector in the config prunes image tokens without asking.
    model.config.vision_selector = "fastv"
    kept = run(model, input_ids, attention_mask, pixel_values).kept_image_token_indices
    assert [len(indices) for indices in kept] == [4, 4, 4]
