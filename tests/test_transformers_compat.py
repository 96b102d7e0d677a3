"""The supported transformers releases (5.23 and 5.24): each one's names, and no deprecation warnings from our code."""

import logging
import warnings

import pytest
import torch
import transformers
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME, HAS_IMAGE_OUTPUTS
from tiny_models import PAD_TOKEN_ID, build_prompts, tiny_model
from tolerances import FP32_SAME_MATH


ROWS = [(3, 1, 5), (8, 1, 2)]


@pytest.fixture
def deprecations(caplog):
    """Collects transformers' deprecation messages (logged once per process, so the once-cache is cleared first) and
    its deprecation warnings."""
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is an lru_cache on the logger class
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        messages = []
        yield messages
        messages += [record.getMessage() for record in caplog.records if "deprecat" in record.getMessage().lower()]
        messages += [str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning)]


def test_the_running_release_is_a_supported_one():
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert (major, minor) in {(5, 23), (5, 24)}, transformers.__version__
    assert CACHE_NAME == ("cache" if minor >= 24 else "past_key_values")
    assert HAS_IMAGE_OUTPUTS == (minor >= 24)


def test_forward_and_generate_log_no_deprecation(deprecations):
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    with torch.no_grad():
        prefill = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True)
        step = model(
            input_ids=input_ids[:, -1:],
            attention_mask=torch.cat([attention_mask, attention_mask[:, -1:]], -1),
            cache=prefill.get(CACHE_NAME),
        )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
        return_dict_in_generate=True,
    )
    assert step.get(CACHE_NAME).get_seq_length() == input_ids.shape[1] + 1
    assert out.get(CACHE_NAME).get_seq_length() == input_ids.shape[1] + 2
    assert not deprecations, deprecations


def test_both_cache_argument_names_are_accepted():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True)
    with torch.no_grad():
        by_new_name = model(**inputs, cache=None)
        by_old_name = model(**inputs, past_key_values=None)
        with pytest.raises(ValueError, match="not both"):
            model(**inputs, cache=by_new_name.get(CACHE_NAME), past_key_values=by_old_name.get(CACHE_NAME))
    torch.testing.assert_close(by_new_name.logits, by_old_name.logits)


def test_outputs_have_the_fields_of_the_running_llava():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert set(LlavaCausalLMOutputWithPast.__dataclass_fields__) <= set(type(out).__dataclass_fields__)
    assert CACHE_NAME in out and out.image_hidden_states.shape == (2, 9, model.config.text_config.hidden_size)
    if HAS_IMAGE_OUTPUTS:
        torch.testing.assert_close(torch.stack(list(out.image_outputs.pooler_output)), out.image_hidden_states)


@pytest.mark.parametrize("predictors", [True, False])
def test_keep_in_fp32_modules_name_only_built_modules(predictors):
    flags = dict(use_vision_predictor=predictors, use_output_text_predictor=predictors, use_instruct_predictor=True)
    model = tiny_model(**flags)
    for module in (model, model.model):
        paths = dict(module.named_modules())
        assert module._keep_in_fp32_modules and all(name in paths for name in module._keep_in_fp32_modules)
    expected = {"model.vision_tower", "model.multi_modal_projector", "model.instruct_score_predictor"}
    if predictors:
        expected |= {"model.image_score_predictor", "model.output_text_score_predictor"}
    assert set(model._keep_in_fp32_modules) == expected


def test_set_attn_implementation_switches_backends_quietly(caplog):
    model = tiny_model("eager")
    input_ids, attention_mask, pixel_values = build_prompts([(3, 1, 4), (1, 1, 2)])
    with torch.no_grad():
        eager = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    with caplog.at_level(logging.WARNING, logger="transformers"):
        model.set_attn_implementation("sdpa")
    assert not [record for record in caplog.records if "does not support" in record.getMessage()]
    for config in (model.config, model.config.text_config, model.config.vision_config):
        assert config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(sdpa, eager, atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH)
