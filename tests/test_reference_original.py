"""Fidelity to the official implementation: the tiny reference checkpoint and its recorded outputs.

`shared/reference/original_tiny` holds a random checkpoint in the official format and what the official code computed
on it (batch size 1, float32, sdpa). It is loaded here through our converter.
"""

import pytest
import torch

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from dynamic_llava_hf.convert import load_original_checkpoint
from dynamic_llava_hf.reference_check import REFERENCE_SCENARIOS as SCENARIOS
from dynamic_llava_hf.reference_check import reference_input_ids


VOCAB = 512  # logits beyond are the appended image-token row
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(reference_dir):
    return torch.load(f"{reference_dir}/reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def models(reference_dir):
    checkpoint = f"{reference_dir}/checkpoint"
    return {
        "default": load_original_checkpoint(checkpoint),
        "instruct": load_original_checkpoint(checkpoint, use_instruct_predictor=True),
    }


def model_for(models, scenario):
    return models["instruct" if SCENARIOS[scenario][1] else "default"]


def hf_input_ids(sample, model):
    return reference_input_ids(sample, model.config)


def samples_and_scenarios():
    return [(sample, scenario) for sample in range(4) for scenario in SCENARIOS]


def test_converted_config(models):
    config = models["default"].config
    assert (config.sparse_layer, config.vision_keep_rate, config.image_seq_length) == (2, 0.2, 25)
    assert config.use_vision_predictor and config.use_output_text_predictor and not config.use_instruct_predictor
    assert (config.predictor_d_model, config.predictor_num_heads, config.predictor_ffn_dim) == (32, 4, 64)
    assert config.image_token_id == VOCAB and config.text_config.vocab_size == VOCAB + 1


@pytest.mark.parametrize("sample_index, scenario", samples_and_scenarios())
def test_prefill_matches_official(models, reference, sample_index, scenario):
    sample = reference["samples"][sample_index]
    expected = sample["results"][scenario]
    forward = expected["forward_cache"]
    model = model_for(models, scenario)
    with torch.no_grad():
        out = model(
            input_ids=hf_input_ids(sample, model),
            pixel_values=sample["pixel_values"],
            sparsity=SCENARIOS[scenario][0],
            output_hidden_states=True,
        )
    if "kept_vision_indices" in expected:
        assert torch.equal(out.kept_image_token_indices[0], expected["kept_vision_indices"])
    else:
        assert out.kept_image_token_indices is None
    assert (out.logits[0, -1, :VOCAB] - forward["last_logits"]).abs().max() <= ATOL
    # The surviving rows sit at their original positions; every other position was removed (zero logits).
    survivors = forward["sparse_layer_position_ids"]
    assert survivors.numel() == forward["sparse_layer_seq_len"]
    assert (out.logits[0, survivors, :VOCAB] - forward["logits"]).abs().max() <= ATOL
    removed = torch.ones(out.logits.shape[1], dtype=torch.bool)
    removed[survivors] = False
    assert out.logits[0, removed].abs().max() == 0 if removed.any() else True
    for layer, reference_states in enumerate(forward["hidden_states"]):
        rows = slice(None) if layer <= model.config.sparse_layer else survivors
        assert (out.hidden_states[layer][0, rows] - reference_states).abs().max() <= ATOL
    assert out.get(CACHE_NAME).stored_lengths()[:, 0].tolist() == forward["kv_len_per_layer"]
    assert out.image_hidden_states[0].sub(forward["image_features"]).abs().max() <= ATOL


def generate(model, sample, scenario, use_cache):
    decisions, predictor_logits = [], []

    def record_decision(module, args, output):
        if output.output_keep_decisions is not None:
            decisions.append(output.output_keep_decisions[0, -1])

    def record_predictor_logits(module, args, output):
        predictor_logits.append(output[0, -1])

    hooks = [
        model.register_forward_hook(record_decision),
        model.model.output_text_score_predictor.register_forward_hook(record_predictor_logits),
    ]
    try:
        out = model.generate(
            input_ids=hf_input_ids(sample, model),
            pixel_values=sample["pixel_values"],
            sparsity=SCENARIOS[scenario][0],
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return out, decisions, predictor_logits


@pytest.mark.parametrize("sample_index, scenario", samples_and_scenarios())
def test_cached_generation_matches_official(models, reference, sample_index, scenario):
    sample = reference["samples"][sample_index]
    expected = sample["results"][scenario]["generate_cache"]
    model = model_for(models, scenario)
    out, decisions, predictor_logits = generate(model, sample, scenario, use_cache=True)
    prompt_length = hf_input_ids(sample, model).shape[1]
    assert torch.equal(out.sequences[0, prompt_length:], expected["new_tokens"])
    assert (torch.stack(out.logits)[:, 0, :VOCAB] - expected["step_logits"]).abs().max() <= ATOL
    assert out.get(CACHE_NAME).stored_lengths()[:, 0].tolist() == expected["kv_len_per_layer"]
    assert out.get(CACHE_NAME).get_seq_length() == prompt_length + 23
    if "output_text_keep_decision" in expected:
        assert torch.equal(torch.stack(decisions), expected["output_text_keep_decision"])
        assert (torch.stack(predictor_logits) - expected["output_text_predictor_logits"]).abs().max() <= ATOL
        report = out.get(CACHE_NAME).sparsity_report()[0]
        assert report["generated_tokens_total"] == 23
        assert report["generated_tokens_kept"] == int(expected["output_text_keep_decision"].sum())
    else:
        assert decisions == []


@pytest.mark.parametrize("sample_index, scenario", samples_and_scenarios())
def test_uncached_generation_matches_official_cached_generation(models, reference, sample_index, scenario):
    """Without a cache we recompute every step, yet must give what the cached path gives (unlike the official code)."""
    sample = reference["samples"][sample_index]
    expected = sample["results"][scenario]["generate_cache"]
    model = model_for(models, scenario)
    out, _, _ = generate(model, sample, scenario, use_cache=False)
    prompt_length = hf_input_ids(sample, model).shape[1]
    assert torch.equal(out.sequences[0, prompt_length:], expected["new_tokens"])
    assert (torch.stack(out.logits)[:, 0, :VOCAB] - expected["step_logits"]).abs().max() <= ATOL
