"""Analytic FLOPs: the paper's LLaVA-1.5-7B prefill figures, and exact matmul counts against torch's FLOP counter."""

import pytest
import torch
from tiny_models import build_prompts, llava_twin, tiny_config, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from dynamic_llava_hf.bench import PRESETS
from dynamic_llava_hf.bench.flops import (
    ModelShape,
    cached_decode_flops,
    decoder_flops,
    merge_flops,
    no_cache_decode_flops,
    paper_layer_flops,
    paper_no_cache_decode_flops,
    paper_prefill_flops,
    prefill_flops,
    total_flops,
)


def test_paper_layer_formula():
    # 32·N·C² + 4·N²·C with N=3, C=5: 32·3·25 + 4·9·5
    assert paper_layer_flops(3, 5) == 2400 + 180


def test_paper_prefill_figures_of_llava_1_5_7b():
    """The paper: 10.1 TFLOPs dense, 2.5 TFLOPs with 576 -> 115 image tokens after layer 2 (within 2%)."""
    shape = ModelShape.from_config(PRESETS["llava-1.5-7b"].config())
    assert (shape.hidden_size, shape.num_layers, shape.image_tokens, shape.sparse_layer) == (4096, 32, 576, 2)
    kept = shape.kept_image_tokens(0.2)
    assert kept == 115
    dense = paper_prefill_flops(shape.hidden_size, shape.num_layers, shape.image_tokens)
    sparse = paper_prefill_flops(shape.hidden_size, shape.num_layers, shape.image_tokens, kept, shape.sparse_layer)
    assert dense == pytest.approx(10.1e12, rel=0.02)
    assert sparse == pytest.approx(2.5e12, rel=0.02)
    # Counting the 40 prompt tokens too would miss the paper's figure: N is the image tokens only.
    assert paper_prefill_flops(4096, 32, 576 + 40) > 10.1e12 * 1.05


def test_paper_no_cache_decoding():
    # Dense: forward s sees image + s outputs in every layer.
    expected = sum(4 * paper_layer_flops(10 + s, 8) for s in range(3))
    assert paper_no_cache_decode_flops(8, 4, 10, 3) == expected
    # Sparse: layers >= 2 see 4 kept image tokens, half of the earlier outputs and the newest one.
    sparse_tokens = [4, 4 + 1, 4 + 0.5 + 1]
    expected = sum(2 * paper_layer_flops(10 + s, 8) + 2 * paper_layer_flops(n, 8) for s, n in enumerate(sparse_tokens))
    assert paper_no_cache_decode_flops(8, 4, 10, 3, kept_image_tokens=4, output_keep_rate=0.5) == expected


def test_bad_arguments_raise():
    shape = ModelShape.from_config(tiny_config(use_vision_predictor=False, use_output_text_predictor=False))
    with pytest.raises(ValueError, match="no image predictor"):
        prefill_flops(shape, 5, vision_keep_rate=0.5)
    with pytest.raises(ValueError, match="no output-text predictor"):
        no_cache_decode_flops(shape, 5, 3, output_keep_rate=0.5)
    with pytest.raises(ValueError, match="one query and one key count per decoder layer"):
        decoder_flops(shape, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="sparse_layer"):
        paper_prefill_flops(64, 4, 10, 5, sparse_layer=4)


# ---------------------------------------------------------------------------------------------------------------------
# Exact counts vs torch.utils.flop_counter (eager attention: on CPU the counter does not see sdpa kernels)

PREDICTOR = "DynamicLlavaForConditionalGeneration.model.image_score_predictor"


def counted(fn) -> FlopCounterMode:
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        fn()
    return counter


def expected_counted(breakdown: dict) -> float:
    # The image predictor's attention core is an sdpa call, which the counter does not see on CPU.
    return total_flops(breakdown) - breakdown.get("image_predictor_attention", 0.0)


def set_output_keep(model, keep: bool) -> None:
    with torch.no_grad():
        model.model.output_text_score_predictor.output_mlp[-1].bias.copy_(
            torch.tensor([50.0, -50.0]) * (1 if keep else -1)
        )


@pytest.fixture(scope="module")
def eager_setup():
    model = tiny_model("eager")
    input_ids, attention_mask, pixel_values = build_prompts([(3, 1, 4), (3, 1, 4)])  # equal lengths, 9 image tokens
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    text_tokens = input_ids.shape[1] - 9
    return model, llava_twin(model, "eager"), inputs, text_tokens


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)


def test_prefill_counts_match_the_flop_counter(eager_setup):
    model, twin, inputs, text_tokens = eager_setup
    shape, keep = ModelShape.from_config(model.config), model.config.vision_keep_rate
    expected = prefill_flops(shape, text_tokens, vision_keep_rate=keep, batch_size=2)
    counter = counted(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    assert counter.get_total_flops() == expected_counted(expected)
    assert sum(counter.get_flop_counts()[PREDICTOR].values()) == expected["image_predictor"]
    # All logits (a plain forward) and the dense baseline.
    full = prefill_flops(shape, text_tokens, vision_keep_rate=keep, batch_size=2, logits_positions=text_tokens + 9)
    assert counted(lambda: model(**inputs)).get_total_flops() == expected_counted(full)
    dense = prefill_flops(shape, text_tokens, batch_size=2)
    assert counted(lambda: twin(**inputs, logits_to_keep=1)).get_total_flops() == total_flops(dense)
    assert total_flops(prefill_flops(shape, text_tokens, vision_keep_rate=keep)) < total_flops(dense) / 2


@pytest.mark.parametrize("keep", [True, False])
def test_cached_decoding_counts_match_the_flop_counter(eager_setup, keep):
    model, _, inputs, text_tokens = eager_setup
    set_output_keep(model, keep)
    shape, rate = ModelShape.from_config(model.config), model.config.vision_keep_rate
    prompt = inputs["input_ids"].shape[1]
    kept_prompt = text_tokens + shape.kept_image_tokens(rate)
    expected = merge_flops(
        prefill_flops(shape, text_tokens, vision_keep_rate=rate, batch_size=2),
        cached_decode_flops(shape, prompt, 5, kept_prompt, output_keep_rate=float(keep), batch_size=2),
    )
    assert counted(lambda: generate(model, inputs)).get_total_flops() == expected_counted(expected)


def test_cached_decoding_of_the_baseline(eager_setup):
    model, twin, inputs, text_tokens = eager_setup
    shape = ModelShape.from_config(model.config)
    prompt = inputs["input_ids"].shape[1]
    expected = merge_flops(
        prefill_flops(shape, text_tokens, batch_size=2), cached_decode_flops(shape, prompt, 5, batch_size=2)
    )
    assert counted(lambda: generate(twin, inputs)).get_total_flops() == total_flops(expected)


@pytest.mark.parametrize("keep", [True, False])
def test_no_cache_decoding_counts_match_the_flop_counter(eager_setup, keep):
    model, twin, inputs, text_tokens = eager_setup
    set_output_keep(model, keep)
    shape, rate = ModelShape.from_config(model.config), model.config.vision_keep_rate
    expected = no_cache_decode_flops(
        shape, text_tokens, 5, vision_keep_rate=rate, output_keep_rate=float(keep), batch_size=2
    )
    assert counted(lambda: generate(model, inputs, use_cache=False)).get_total_flops() == expected_counted(expected)
    dense = no_cache_decode_flops(shape, text_tokens, 5, batch_size=2)
    assert counted(lambda: generate(twin, inputs, use_cache=False)).get_total_flops() == total_flops(dense)
