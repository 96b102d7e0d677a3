"""Fidelity check against the official implementation's outputs on its tiny reference checkpoint."""

import os

import torch

from .compat_dynamic_llava import CACHE_NAME
from .convert import load_original_checkpoint


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
                    "kv_lengths_match": out[CACHE_NAME].stored_lengths()[:, 0].tolist()
                    == expected["kv_len_per_layer"],
                    "max_logit_diff": float((logits - expected["step_logits"]).abs().max()),
                }
            )
    return results
