"""Offline demonstrations: a tiny random model, and a fidelity check against the official reference outputs."""

import os

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from .configuration_dynamic_llava import DynamicLlavaConfig
from .convert_dynamic_llava import load_original_checkpoint
from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration


def random_tiny_model(seed: int = 0) -> DynamicLlavaForConditionalGeneration:
    """A small random Dynamic-LLaVA (4 layers, 36 image tokens per image) for trying the API without weights."""
    torch.manual_seed(seed)
    config = DynamicLlavaConfig(
        text_config=LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            pad_token_id=0,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=84,
            patch_size=14,
        ),
        image_token_index=255,
        image_seq_length=36,
        predictor_d_model=32,
        predictor_num_heads=4,
        predictor_ffn_dim=64,
    )
    model = DynamicLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # untrained predictors keep or drop almost everything; spread the decisions
        model.model.output_text_score_predictor.output_mlp[-1].weight.mul_(50.0)
    return model


def run_demo(batch_size: int = 3, max_new_tokens: int = 32) -> list[dict]:
    """Batched generation with a tiny random model; returns the cache's sparsity report."""
    model = random_tiny_model()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    rows = []
    for row in range(batch_size):
        text_before = torch.randint(3, 250, (2 + 3 * row,), generator=generator).tolist()
        text_after = torch.randint(3, 250, (6,), generator=generator).tolist()
        rows.append([1] + text_before + [config.image_token_id] * config.image_seq_length + text_after)
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :] = torch.tensor(row)
        attention_mask[index, length - len(row) :] = 1
    pixel_values = torch.randn(batch_size, 3, 84, 84, generator=generator)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    return out.past_key_values.sparsity_report()


# The reference's scenarios: name -> (per-call sparsity, config overrides used when converting the checkpoint).
REFERENCE_SCENARIOS = {
    "sparse_on": (None, {}),
    "sparse_off": (False, {}),
    "vision_only": ({"use_output_text_predictor": False}, {}),
    "instruct_on": (None, {"use_instruct_predictor": True}),
}


def reference_input_ids(sample: dict, config) -> torch.LongTensor:
    """The official `-200` image placeholder expanded into one image token per image feature, `[1, seq]`."""
    ids = sample["input_ids"][0]
    position = (ids == -200).nonzero().item()
    image = torch.full((config.image_seq_length,), config.image_token_id)
    return torch.cat([ids[:position], image, ids[position + 1 :]])[None]


def check_reference(reference_dir: str) -> list[dict]:
    """Runs the official tiny reference (shared/reference/original_tiny) through the converter and compares.

    Returns one row per sample and scenario: whether kept image tokens, generated tokens and KV lengths match exactly,
    and the largest logit difference.
    """
    reference = torch.load(os.path.join(reference_dir, "reference.pt"), weights_only=True)
    checkpoint = os.path.join(reference_dir, "checkpoint")
    models = {}
    results = []
    for scenario, (sparsity, overrides) in REFERENCE_SCENARIOS.items():
        key = tuple(sorted(overrides.items()))
        model = models.setdefault(key, load_original_checkpoint(checkpoint, **overrides))
        vocab = model.config.image_token_id
        for sample in reference["samples"]:
            input_ids = reference_input_ids(sample, model.config)
            expected = sample["results"][scenario]["generate_cache"]
            out = model.generate(
                input_ids=input_ids,
                pixel_values=sample["pixel_values"],
                sparsity=sparsity,
                max_new_tokens=len(expected["new_tokens"]),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            logits = torch.stack(out.logits)[:, 0, :vocab]
            results.append(
                {
                    "scenario": scenario,
                    "sample": sample["name"],
                    "tokens_match": torch.equal(out.sequences[0, input_ids.shape[1] :], expected["new_tokens"]),
                    "kv_lengths_match": out.past_key_values.stored_lengths()[:, 0].tolist()
                    == expected["kv_len_per_layer"],
                    "max_logit_diff": float((logits - expected["step_logits"]).abs().max()),
                }
            )
    return results
