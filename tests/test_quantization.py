"""device_map / disk offload, bitsandbytes 8-bit and 4-bit on CPU, and half-precision loading of a saved folder.

What must never be weight-quantised (the predictors, the vision tower, the projector) is declared in the models'
`_keep_in_fp32_modules` (the predictors only where built), which every transformers quantizer adds to its
`modules_to_not_convert`; lm_head is kept by transformers' own default skip list.
"""

import importlib.util

import pytest
import torch
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_checkpoint import save_tiny_checkpoint, tiny_images
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, BitsAndBytesConfig

from dynamic_llava_hf import DynamicLlavaModel


requires_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (it is in the `test` extra: pip install -e .[test])",
)
NEVER_QUANTISED = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.image_score_predictor",
    "model.output_text_score_predictor",
)
MAX_NEW_TOKENS = 6
# bitsandbytes' CPU 4-bit kernels quantise in blocks of 64 input features: every quantised Linear needs in_features a
# multiple of 64 (the default tiny hidden size, 32, fails inside bnb with "shape '[32, 0]' is invalid").
BNB_FRIENDLY_TEXT = {"hidden_size": 64, "intermediate_size": 128}


def make_inputs(processor, questions=("w1 w2 w3", "w7 w8 w9 w10 w11")):
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    return processor(images=tiny_images(len(questions)), text=prompts, padding=True, return_tensors="pt")


def greedy(model, inputs):
    return model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True
    )


def linear_types(model) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def assert_quantised_where_it_should_be(model, quantised_type: str, lm_head_type: str = "Linear"):
    types = linear_types(model)
    decoder = {name: kind for name, kind in types.items() if name.startswith("model.language_model.")}
    assert decoder and set(decoder.values()) == {quantised_type}, decoder
    for prefix in NEVER_QUANTISED:
        kept = {name: kind for name, kind in types.items() if name.startswith(prefix)}
        assert kept and set(kept.values()) == {"Linear"}, kept
    assert types["lm_head"] == lm_head_type


def prefill_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    model, processor = save_tiny_checkpoint(folder, text_overrides=BNB_FRIENDLY_TEXT)
    inputs = make_inputs(processor)
    return folder, model, inputs, greedy(model, inputs)


# ---------------------------------------------------------------------------------------------------------------------
# device_map


def test_device_map_auto_gives_identical_outputs(checkpoint):
    folder, _, inputs, expected = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(folder, device_map="auto").eval()
    out = greedy(model, inputs)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(torch.stack(out.scores), torch.stack(expected.scores))


def test_disk_offload_gives_identical_outputs(checkpoint, tmp_path):
    folder, reference, inputs, expected = checkpoint
    model_bytes = sum(parameter.numel() * parameter.element_size() for parameter in reference.parameters())
    # 40% of the weights fit in memory: accelerate must put the rest on disk.
    model = AutoModelForImageTextToText.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": int(model_bytes * 0.4)}, offload_folder=str(tmp_path)
    ).eval()
    placements = model.hf_device_map
    assert {"cpu", "disk"} <= set(placements.values()), placements  # really split between memory and disk
    assert placements["model.image_score_predictor"] == "disk" and placements["lm_head"] == "disk", placements
    out = greedy(model, inputs)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(torch.stack(out.scores), torch.stack(expected.scores))
    assert torch.equal(out.get(CACHE_NAME).stored_lengths(), expected.get(CACHE_NAME).stored_lengths())


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes


@requires_bitsandbytes
def test_8bit_quantises_the_decoder_only_and_generates(checkpoint):
    folder, reference, inputs, _ = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    ).eval()
    assert_quantised_where_it_should_be(model, "Linear8bitLt")
    assert model.model.image_score_predictor.down_mlp[1].weight.dtype == torch.float32

    out = greedy(model, inputs)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + MAX_NEW_TOKENS)
    report = out.get(CACHE_NAME).sparsity_report()
    assert [(row["image_tokens_kept"], row["image_tokens_total"]) for row in report] == [(4, 9), (4, 9)]
    # int8 weights: close to the float model, not equal.
    logits, expected = prefill_logits(model, inputs), prefill_logits(reference, inputs)
    assert ((logits - expected).norm() / expected.norm()) < 0.05


@requires_bitsandbytes
def test_4bit_quantises_the_decoder_only_and_generates(checkpoint):
    folder, reference, inputs, _ = checkpoint
    for config in (
        BitsAndBytesConfig(load_in_4bit=True),
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    ):
        model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config).eval()
        assert_quantised_where_it_should_be(model, "Linear4bit")
        out = greedy(model, inputs)
        assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + MAX_NEW_TOKENS)
        assert all(row["image_tokens_kept"] == 4 for row in out.get(CACHE_NAME).sparsity_report())
        # 4-bit weights of a random model: the logits keep their direction.
        similarity = nn.functional.cosine_similarity(prefill_logits(model, inputs), prefill_logits(reference, inputs))
        assert bool((similarity > 0.9).all()), similarity


@requires_bitsandbytes
def test_own_skip_list_still_keeps_predictors_vision_and_projector(checkpoint):
    """`llm_int8_skip_modules` replaces transformers' default skips (lm_head), but `_keep_in_fp32_modules` is always
    added: the user decides about lm_head, never about the predictors, vision tower or projector."""
    folder, _, inputs, _ = checkpoint
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["up_proj"])
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config).eval()
    types = linear_types(model)
    assert types["lm_head"] == "Linear8bitLt"  # transformers' rule: the user's list replaces the defaults
    assert types["model.language_model.layers.0.mlp.up_proj"] == "Linear"
    assert types["model.language_model.layers.0.self_attn.q_proj"] == "Linear8bitLt"
    for prefix in NEVER_QUANTISED:
        assert {kind for name, kind in types.items() if name.startswith(prefix)} == {"Linear"}, prefix
    assert greedy(model, inputs).sequences.shape[1] == inputs["input_ids"].shape[1] + MAX_NEW_TOKENS

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config)
    assert_quantised_where_it_should_be(model, "Linear8bitLt")


@requires_bitsandbytes
def test_8bit_bare_model_keeps_the_same_modules(checkpoint):
    folder, _, inputs, _ = checkpoint
    model = AutoModel.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    assert isinstance(model, DynamicLlavaModel)
    types = linear_types(model)
    assert {kind for name, kind in types.items() if name.startswith("language_model.")} == {"Linear8bitLt"}
    for prefix in ("vision_tower", "multi_modal_projector", "image_score_predictor", "output_text_score_predictor"):
        assert {kind for name, kind in types.items() if name.startswith(prefix)} == {"Linear"}, prefix
    with torch.no_grad():
        out = model(**inputs)
    assert [len(kept) for kept in out.kept_image_token_indices] == [4, 4]


# ---------------------------------------------------------------------------------------------------------------------
# Half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(checkpoint, dtype):
    folder, reference, inputs, _ = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    decoder_dtype = model.model.language_model.layers[0].self_attn.q_proj.weight.dtype
    predictor_dtype = model.model.image_score_predictor.down_mlp[1].weight.dtype
    vision_dtype = model.model.vision_tower.embeddings.patch_embedding.weight.dtype
    assert decoder_dtype == model.lm_head.weight.dtype == dtype
    # transformers keeps `_keep_in_fp32_modules` in float32 for float16 loads only; bfloat16 loads everything as is.
    expected_small_modules_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert predictor_dtype == vision_dtype == expected_small_modules_dtype
    assert model.model.output_text_score_predictor.output_mlp[1].weight.dtype == expected_small_modules_dtype

    half_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}  # as the pipeline casts them
    out = greedy(model, half_inputs)
    report = out.get(CACHE_NAME).sparsity_report()
    assert all(row["image_tokens_kept"] == 4 and row["generated_tokens_total"] == MAX_NEW_TOKENS - 1 for row in report)
    assert out.get(CACHE_NAME).layers[-1].keys.dtype == dtype
    with torch.no_grad():
        logits = model(**half_inputs).logits[:, -1]
    assert logits.dtype == dtype and bool(logits.isfinite().all())
    similarity = nn.functional.cosine_similarity(logits.float(), prefill_logits(reference, inputs))
    assert bool((similarity > 0.99).all()), similarity
